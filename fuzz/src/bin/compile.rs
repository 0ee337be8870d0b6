//! Custom resources as YAML, parsed and compiled, standalone and for a workload: never a panic,
//! and the same config twice.

use bulwark_api::{CompileOptions, Workload, compile, manifest};

fn main() {
    let workload = Workload { namespace: "default".into(), labels: [("app".to_owned(), "chat".to_owned())].into() };
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else { return };
        let (resources, _errors) = manifest::parse(text, "default");
        let _ = resources.duplicates();
        for w in [None, Some(&workload)] {
            let first = compile(&resources, w, &CompileOptions::default());
            let again = compile(&resources, w, &CompileOptions::default());
            assert_eq!(first, again, "compile() is deterministic");
        }
    });
}
