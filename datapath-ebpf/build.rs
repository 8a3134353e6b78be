// SPDX-License-Identifier: MIT OR GPL-2.0
fn main() {
    // bpf-linker is required to link the eBPF object; rebuild when it changes
    // (e.g. `cargo xtask setup` rebuilt it for a new LLVM).
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
