// SPDX-License-Identifier: MIT OR Apache-2.0
//! The conntrack state machine, shared by the datapath and the host tests.
//! Time is a parameter (nanoseconds of `bpf_ktime_get_coarse_ns`, i.e.
//! CLOCK_MONOTONIC_COARSE), so the host tests drive it with a fake clock.

use crate::{PROTO_TCP, PROTO_UDP};

/// `CtEntry::state` values.
pub const STATE_SYN_SENT: u8 = 1;
pub const STATE_ESTABLISHED: u8 = 2;
pub const STATE_CLOSING: u8 = 3;
pub const STATE_CLOSED: u8 = 4;
pub const STATE_UDP: u8 = 5;

/// TCP header flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;
/// Timeouts, as Cilium's defaults: SYN 60 s, established 6 h, FIN/RST 10 s, UDP 60 s.
pub const TIMEOUT_SYN_NS: u64 = 60 * SEC;
pub const TIMEOUT_ESTABLISHED_NS: u64 = 6 * 3600 * SEC;
pub const TIMEOUT_CLOSE_NS: u64 = 10 * SEC;
pub const TIMEOUT_UDP_NS: u64 = 60 * SEC;
/// An entry's `last_seen_ns` is rewritten at most this often (unless its
/// state changes), so a busy flow does not dirty its cache line on every packet.
pub const REFRESH_NS: u64 = SEC;

/// State of a flow's first packet.
#[inline(always)]
pub const fn initial_state(proto: u8, tcp_flags: u8) -> u8 {
    if proto == PROTO_UDP {
        STATE_UDP
    } else if tcp_flags & TCP_RST != 0 {
        STATE_CLOSED
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 {
        STATE_SYN_SENT
    } else {
        // Mid-stream packet whose entry was lost (LRU eviction, agent
        // upgrade): adopt it as established, as Katran and Cilium do.
        STATE_ESTABLISHED
    }
}

/// State after a packet of an existing flow. `reply` is true for the
/// backend → client direction.
#[inline(always)]
pub const fn next_state(proto: u8, state: u8, tcp_flags: u8, reply: bool) -> u8 {
    if proto != PROTO_TCP {
        return STATE_UDP;
    }
    if tcp_flags & TCP_RST != 0 {
        return STATE_CLOSED;
    }
    if tcp_flags & TCP_FIN != 0 {
        return if state == STATE_CLOSED { STATE_CLOSED } else { STATE_CLOSING };
    }
    match state {
        STATE_SYN_SENT => {
            let syn_ack = tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK);
            let ack = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK;
            if (reply && syn_ack) || (!reply && ack) { STATE_ESTABLISHED } else { STATE_SYN_SENT }
        }
        s => s,
    }
}

/// How long an entry in `state` lives without traffic.
#[inline(always)]
pub const fn timeout_ns(state: u8) -> u64 {
    match state {
        STATE_SYN_SENT => TIMEOUT_SYN_NS,
        STATE_ESTABLISHED => TIMEOUT_ESTABLISHED_NS,
        STATE_UDP => TIMEOUT_UDP_NS,
        _ => TIMEOUT_CLOSE_NS,
    }
}

/// True when an entry last seen at `last_seen_ns` in `state` is dead at `now_ns`.
#[inline(always)]
pub const fn expired(state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_ns(state)
}

/// True when a forward packet must start a new flow even though an entry
/// exists: the entry expired, or it is closing/closed and a new SYN reuses
/// the tuple (a client port reused after TIME_WAIT gets a fresh pick).
#[inline(always)]
pub const fn starts_new_flow(proto: u8, state: u8, last_seen_ns: u64, now_ns: u64, tcp_flags: u8) -> bool {
    if expired(state, last_seen_ns, now_ns) {
        return true;
    }
    proto == PROTO_TCP
        && (state == STATE_CLOSING || state == STATE_CLOSED)
        && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_handshake_to_close() {
        let s = initial_state(PROTO_TCP, TCP_SYN);
        assert_eq!(s, STATE_SYN_SENT);
        let s = next_state(PROTO_TCP, s, TCP_SYN | TCP_ACK, true);
        assert_eq!(s, STATE_ESTABLISHED);
        assert_eq!(next_state(PROTO_TCP, s, TCP_ACK, false), STATE_ESTABLISHED);
        let s = next_state(PROTO_TCP, s, TCP_FIN | TCP_ACK, false);
        assert_eq!(s, STATE_CLOSING);
        assert_eq!(timeout_ns(s), TIMEOUT_CLOSE_NS);
        assert_eq!(next_state(PROTO_TCP, s, TCP_RST, true), STATE_CLOSED);
    }

    #[test]
    fn syn_sent_needs_an_ack_to_establish() {
        assert_eq!(next_state(PROTO_TCP, STATE_SYN_SENT, TCP_SYN, false), STATE_SYN_SENT);
        assert_eq!(next_state(PROTO_TCP, STATE_SYN_SENT, TCP_ACK, false), STATE_ESTABLISHED);
        assert_eq!(next_state(PROTO_TCP, STATE_SYN_SENT, TCP_ACK, true), STATE_SYN_SENT);
    }

    #[test]
    fn mid_stream_packet_is_adopted_and_rst_closes() {
        assert_eq!(initial_state(PROTO_TCP, TCP_ACK), STATE_ESTABLISHED);
        assert_eq!(initial_state(PROTO_TCP, TCP_RST | TCP_ACK), STATE_CLOSED);
        assert_eq!(initial_state(PROTO_UDP, 0), STATE_UDP);
    }

    #[test]
    fn timeouts_with_a_fake_clock() {
        let t0 = 1_000 * SEC;
        assert!(!expired(STATE_ESTABLISHED, t0, t0 + TIMEOUT_ESTABLISHED_NS));
        assert!(expired(STATE_ESTABLISHED, t0, t0 + TIMEOUT_ESTABLISHED_NS + 1));
        assert!(expired(STATE_SYN_SENT, t0, t0 + 61 * SEC));
        assert!(!expired(STATE_UDP, t0, t0 + 59 * SEC));
        assert!(expired(STATE_UDP, t0, t0 + 61 * SEC));
        // A closed tuple reused by a new SYN starts a new flow; an ACK does not.
        assert!(starts_new_flow(PROTO_TCP, STATE_CLOSED, t0, t0 + 1, TCP_SYN));
        assert!(!starts_new_flow(PROTO_TCP, STATE_CLOSED, t0, t0 + 1, TCP_ACK));
        assert!(!starts_new_flow(PROTO_TCP, STATE_ESTABLISHED, t0, t0 + 1, TCP_SYN));
        // A clock that went backwards never expires an entry.
        assert!(!expired(STATE_SYN_SENT, t0, t0 - SEC));
    }
}
