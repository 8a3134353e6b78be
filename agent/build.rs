// SPDX-License-Identifier: MIT OR Apache-2.0
//! Builds the eBPF object (datapath-ebpf) with the nightly toolchain and the
//! bpfel target, so it can be embedded in the `xlb` binary.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../datapath-ebpf");
    let root = dir.to_str().context("path is not UTF-8")?;
    // aya-build only watches the crate root; its sources and the shared ABI matter too.
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/../datapath-common/src");
    aya_build::build_ebpf([Package { name: "datapath-ebpf", root_dir: root, ..Default::default() }], Toolchain::Nightly)
}
