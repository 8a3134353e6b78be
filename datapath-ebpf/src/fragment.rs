// SPDX-License-Identifier: MIT OR GPL-2.0
//! Later IP fragments follow their first fragment (Cilium's
//! IPV4_FRAG_DATAGRAMS approach, for IPv6 too).
//!
//! Only a datagram's first fragment carries the L4 header. When xlb
//! translates one (`pipeline::translate`), it records the ports in FRAGS
//! under the fragment's own {source, destination, protocol, id}; the later
//! fragments, which share that key, find the ports there, then the same
//! conntrack entry, and get the same translation: the addresses only (the
//! L4 checksum, which covers the pseudo header, was updated in the first
//! fragment). Works in both directions, since each direction's first
//! fragment records its own key. A later fragment with no record (it came
//! first, or its datagram is not translated) passes unchanged as `fragment`.

use crate::{
    hook::{Action, Hook},
    maps::FRAGS,
    nat::Target,
    parse::{Flow, Parsed, parse},
    pipeline::{Step, conntrack, done},
};
use datapath_common::{FragKey, FragPorts, verdict};

#[inline(always)]
fn key(flow: &Flow) -> FragKey {
    FragKey { src: flow.src, dst: flow.dst, id: flow.frag_id, proto: flow.proto, _pad: [0; 3] }
}

/// Remembers the ports of a first fragment being translated.
#[inline(always)]
pub fn record(flow: &Flow) {
    let _ = FRAGS.insert(&key(flow), &FragPorts { sport: flow.sport, dport: flow.dport }, 0);
}

/// The program behind `tail::FRAGMENT`: a later fragment, parsed again.
#[inline(always)]
pub fn follow(hook: &mut impl Hook) -> Action {
    let mut flow = core::mem::MaybeUninit::<Flow>::uninit();
    // SAFETY: only read after `parse` reported a later fragment, for which
    // it wrote every field but the ports and TCP flags, set below.
    let flow = unsafe { &mut *flow.as_mut_ptr() };
    if parse(hook, flow) != Parsed::Fragment {
        return done(verdict::FRAGMENT, Action::Pass);
    }
    // SAFETY: the value is plain data, copied out at once.
    let Some(ports) = (unsafe { FRAGS.get(&key(flow)) }).copied() else {
        return done(verdict::FRAGMENT, Action::Pass);
    };
    flow.sport = ports.sport;
    flow.dport = ports.dport;
    flow.tcp_flags = 0;
    let len = (flow.l4 + flow.l4_len) as u32;
    let mut t = core::mem::MaybeUninit::<Target>::uninit();
    // SAFETY: `conntrack` writes src, dst and ports before any use.
    let t = unsafe { &mut *t.as_mut_ptr() };
    match conntrack::<true>(hook, flow, len, t) {
        Step::Done(action) => action,
        // The entry expired or lost its backend since the first fragment.
        Step::Pass(_) => done(verdict::FRAGMENT, Action::Pass),
        _ => done(verdict::REWRITE_FAILED, Action::Drop),
    }
}
