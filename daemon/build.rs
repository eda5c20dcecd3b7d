//! Embeds every kit definition in `../kits/*.toml` into the binary, so the daemon
//! runs on its shipped kits with no files beside it. Adding a kit file needs no code.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let kits = manifest.join("../kits");
    println!("cargo:rerun-if-changed={}", kits.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&kits)
        .expect("kits/ directory beside daemon/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut out = String::from("/// (file name, TOML text) of every kit shipped in `kits/`.\n");
    out.push_str("pub(crate) const BUILTIN_KITS: &[(&str, &str)] = &[\n");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        let name = file.file_name().expect("a file").to_string_lossy();
        let _ = writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            file.display().to_string()
        );
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("builtin_kits.rs");
    std::fs::write(dest, out).expect("write builtin_kits.rs");
}
