// SPDX-License-Identifier: MIT OR GPL-2.0
//! Empty library target: lets `agent` name this crate as a build-dependency so
//! cargo rebuilds the embedded eBPF object when it changes (aya-template pattern).
#![no_std]
