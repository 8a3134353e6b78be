// SPDX-License-Identifier: MIT OR GPL-2.0
//! Empty library target: lets `agent` name this crate as a build-dependency so
//! cargo rebuilds the embedded eBPF object when it changes (aya-template pattern).
#![no_std]

/// What every eBPF binary of this crate needs besides its programs: a
/// panic handler (never reached: the verifier rejects panicking code) and
/// the license section.
#[macro_export]
macro_rules! object_boilerplate {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
