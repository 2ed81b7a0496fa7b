//! Address prefixes.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address prefix in its own family (host bits always zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Net {
    pub addr: IpAddr,
    pub len: u8,
}

fn bits(a: &IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v) => (u128::from(u32::from(*v)) << 96, 32),
        IpAddr::V6(v) => (u128::from(*v), 128),
    }
}

fn mask(len: u8, family_bits: u8) -> u128 {
    // Bits are left-aligned in a u128 for both families.
    let _ = family_bits;
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl Net {
    /// Parse `a.b.c.d/n`, `x::/n` or a bare address (a host prefix).
    pub fn parse(s: &str) -> Result<Net, String> {
        let s = s.trim();
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{s}` is not an IPv4 or IPv6 address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => {
                let n: u8 = l
                    .parse()
                    .map_err(|_| format!("`{s}` has a prefix length that is not a number"))?;
                if n > max {
                    return Err(format!(
                        "`{s}` has prefix length {n}, but an {} prefix is at most /{max}",
                        if max == 32 { "IPv4" } else { "IPv6" }
                    ));
                }
                n
            }
        };
        let net = Net::new(addr, len);
        if net.addr != addr {
            return Err(format!("`{s}` has host bits set; did you mean `{}`?", net));
        }
        Ok(net)
    }

    /// The prefix of `len` bits containing `addr` (host bits cleared).
    pub fn new(addr: IpAddr, len: u8) -> Net {
        let (b, fam) = bits(&addr);
        let m = b & mask(len, fam);
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((m >> 96) as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(m)),
        };
        Net { addr, len }
    }

    pub fn host(addr: IpAddr) -> Net {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Net { addr, len }
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn contains_addr(&self, a: &IpAddr) -> bool {
        if self.addr.is_ipv4() != a.is_ipv4() {
            return false;
        }
        let (x, fam) = bits(&self.addr);
        let (y, _) = bits(a);
        let m = mask(self.len, fam);
        x & m == y & m
    }

    /// `self ⊇ other`.
    pub fn contains(&self, other: &Net) -> bool {
        other.len >= self.len && self.contains_addr(&other.addr)
    }

    pub fn all_v4() -> Net {
        Net {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            len: 0,
        }
    }

    pub fn all_v6() -> Net {
        Net {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            len: 0,
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Parse a MAC `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!(
            "`{s}` is not a MAC address (expected aa:bb:cc:dd:ee:ff)"
        ));
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("`{s}` is not a MAC address (expected aa:bb:cc:dd:ee:ff)"))?;
    }
    Ok(m)
}

pub use bulkhead_abi::model::format_mac as fmt_mac;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_contain() {
        let n = Net::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(&Net::parse("10.1.2.0/24").unwrap()));
        assert!(!n.contains(&Net::parse("10.0.0.0/8").unwrap()));
        assert!(Net::parse("10.1.0.1/16").unwrap_err().contains("host bits"));
        assert!(Net::parse("10.1.0.0/33").is_err());
        assert!(Net::parse("fd00::/8")
            .unwrap()
            .contains_addr(&"fd00::1".parse().unwrap()));
        assert!(!Net::all_v4().contains_addr(&"::1".parse().unwrap()));
        assert_eq!(parse_mac("52:54:00:aa:bb:0c").unwrap()[5], 0x0c);
        assert!(parse_mac("52:54:00:aa:bb").is_err());
    }
}
