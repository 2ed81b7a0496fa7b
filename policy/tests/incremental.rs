use std::path::Path;

use bulkhead_policy::incremental::Incremental;
use bulkhead_policy::*;

fn load(dir: &Path) -> Resolved {
    load_dir(dir, None).unwrap_or_else(|e| panic!("{e}")).1
}

fn copy_example(to: &Path) {
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn incremental_recomputes_only_touched_hosts_and_equals_full_compile() {
    let t = std::env::temp_dir().join(format!("bulkhead-inc-{}", std::process::id()));
    std::fs::create_dir_all(&t).unwrap();
    copy_example(&t);
    let mut inc = Incremental::default();
    let a = inc.compile(&load(&t));
    assert_eq!(inc.last_recomputed, 3);
    assert_eq!(a, compile(&load(&t)));
    // Nothing changed: nothing recomputed.
    let b = inc.compile(&load(&t));
    assert_eq!(inc.last_recomputed, 0);
    assert_eq!(a, b);
    // Change the PACS rule's services: PACS (kvm-03) and its symmetric clients change; a
    // host without PACS clients would be reused.
    let p = t.join("40-application.yaml");
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        s.replace("services: [dicom, https]", "services: [dicom]"),
    )
    .unwrap();
    let res = load(&t);
    let c = inc.compile(&res);
    assert!(inc.last_recomputed >= 1);
    assert!(
        inc.last_fast_path,
        "only a rule changed: the fast path applies"
    );
    assert_eq!(c, compile(&res));
    assert_ne!(c.revision, a.revision);
    // One VM's labels: only its host.
    let p = t.join("inventory.yaml");
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        s.replace(
            "labels: {role: jump, env: prod, zone: mgmt}",
            "labels: {role: jump, env: prod, zone: mgmt, owner: it}",
        ),
    )
    .unwrap();
    let res = load(&t);
    let d = inc.compile(&res);
    assert_eq!(
        inc.last_recomputed, 0,
        "a label no selector reads changes nothing"
    );
    assert_eq!(d, compile(&res));
    std::fs::remove_dir_all(&t).ok();
}
