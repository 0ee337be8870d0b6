//! Writes the CRD YAML generated from the Rust types into the repository
//! (`crds/yaml/` and the Helm chart's `crds/`). `--check` fails on drift instead.

use std::{fs, path::Path, process::ExitCode};

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirs = [root.join("crds/yaml"), root.join("charts/bulwark/crds")];
    let mut stale = vec![];
    for dir in &dirs {
        for (file, yaml) in bulwark_api::crds() {
            let path = dir.join(file);
            let current = fs::read_to_string(&path).unwrap_or_default();
            if current == yaml {
                continue;
            }
            if check {
                stale.push(path.display().to_string());
            } else if let Err(e) = fs::create_dir_all(dir).and_then(|_| fs::write(&path, &yaml)) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    if stale.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("crdgen: stale CRD YAML, run `make crds`: {}", stale.join(", "));
        ExitCode::FAILURE
    }
}
