//! aya `Pod` impls: every type here is `#[repr(C)]`, `Copy`, with explicit padding and no
//! invalid bit patterns.
use crate::types::*;

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: repr(C), Copy, padding is explicit, every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

pod!(
    Config,
    EndpointKey,
    EndpointInfo,
    EndpointAddrKey,
    IpcacheKey,
    PolicyKey,
    Verdict,
    CtKey,
    CtEntry,
    FragKey,
    FragEntry,
    RuleStats,
    EndpointStats,
    EventBudget,
    FlowEvent,
);
