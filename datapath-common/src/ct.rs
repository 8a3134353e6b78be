// SPDX-License-Identifier: MIT OR Apache-2.0
//! The conntrack state machine, shared by the datapath and the host tests.
//! Time is a parameter (nanoseconds of `bpf_ktime_get_coarse_ns`, i.e.
//! CLOCK_MONOTONIC_COARSE), so the host tests drive it with a fake clock.

use crate::{CtEntry, PROTO_TCP, PROTO_UDP};

/// `CtEntry::state` values. A FIN does not change the state: it sets the
/// entry's `fin_out` (its own direction) or `fin_in` (the other one), and
/// the flow is closing only once both are set (`closing`).
pub const STATE_SYN_SENT: u8 = 1;
pub const STATE_ESTABLISHED: u8 = 2;
/// Entries written before the per-direction FIN bytes existed (any FIN
/// closed the flow); kept so a restored entry keeps its meaning.
pub const STATE_CLOSING: u8 = 3;
pub const STATE_CLOSED: u8 = 4;
pub const STATE_UDP: u8 = 5;

/// TCP header flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;
/// Timeouts, as Cilium's defaults: SYN 60 s, established 6 h, closing (FINs both ways, or a RST) 10 s, UDP 60 s.
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
/// backend → client direction. A FIN leaves the state as it is (see
/// `closing`); a RST closes the flow in both directions.
#[inline(always)]
pub const fn next_state(proto: u8, state: u8, tcp_flags: u8, reply: bool) -> u8 {
    if proto != PROTO_TCP {
        return STATE_UDP;
    }
    if tcp_flags & TCP_RST != 0 {
        return STATE_CLOSED;
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

/// True when both directions of a TCP flow sent a FIN (Cilium's
/// `tx_closing && rx_closing`), or the entry predates the per-direction
/// bytes and saw a FIN. A half-closed flow (one FIN) is not closing: its
/// quiet side may still be sending, so it keeps the established timeout.
#[inline(always)]
pub const fn closing(e: &CtEntry) -> bool {
    closing_of(e.state, e.fin_out != 0, e.fin_in != 0)
}

/// `closing` for a flow in `state` whose directions did (`fin_out`,
/// `fin_in`) send a FIN; shared with the conntrack table's records.
#[inline(always)]
pub const fn closing_of(state: u8, fin_out: bool, fin_in: bool) -> bool {
    state == STATE_CLOSING || (fin_out && fin_in)
}

/// How long entry `e` lives without traffic.
#[inline(always)]
pub const fn timeout_ns(e: &CtEntry) -> u64 {
    timeout_of(e.state, closing(e))
}

/// How long a flow in `state` lives without traffic (`closing`: both sides
/// sent a FIN).
#[inline(always)]
pub const fn timeout_of(state: u8, closing: bool) -> u64 {
    if closing {
        return TIMEOUT_CLOSE_NS;
    }
    match state {
        STATE_SYN_SENT => TIMEOUT_SYN_NS,
        STATE_ESTABLISHED => TIMEOUT_ESTABLISHED_NS,
        STATE_UDP => TIMEOUT_UDP_NS,
        _ => TIMEOUT_CLOSE_NS,
    }
}

/// True when entry `e` is dead at `now_ns`. A `last_seen_ns` of 0 marks an
/// entry a new flow is taking over (the datapath's `claim`): dead as well.
#[inline(always)]
pub const fn expired(e: &CtEntry, now_ns: u64) -> bool {
    e.last_seen_ns == 0 || now_ns.saturating_sub(e.last_seen_ns) > timeout_ns(e)
}

/// True when a forward packet must start a new flow even though entry `e`
/// exists: the entry expired, or the flow is closing/closed and a new SYN
/// reuses the tuple (a client port reused after TIME_WAIT gets a fresh
/// pick). A SYN on a half-closed flow does not.
#[inline(always)]
pub const fn starts_new_flow(proto: u8, e: &CtEntry, now_ns: u64, tcp_flags: u8) -> bool {
    expired(e, now_ns) || reopens(proto, e.state, closing(e), tcp_flags)
}

/// True when a SYN (no ACK) reuses the tuple of a TCP flow in `state` that
/// is `closing` or closed: a new flow, with a fresh pick.
#[inline(always)]
pub const fn reopens(proto: u8, state: u8, closing: bool, tcp_flags: u8) -> bool {
    proto == PROTO_TCP && (closing || state == STATE_CLOSED) && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: u8, last_seen_ns: u64) -> CtEntry {
        CtEntry { state, last_seen_ns, ..CtEntry::default() }
    }

    #[test]
    fn tcp_handshake_to_close() {
        let s = initial_state(PROTO_TCP, TCP_SYN);
        assert_eq!(s, STATE_SYN_SENT);
        let s = next_state(PROTO_TCP, s, TCP_SYN | TCP_ACK, true);
        assert_eq!(s, STATE_ESTABLISHED);
        assert_eq!(next_state(PROTO_TCP, s, TCP_ACK, false), STATE_ESTABLISHED);
        // A FIN is recorded per direction, not in the state.
        assert_eq!(next_state(PROTO_TCP, s, TCP_FIN | TCP_ACK, false), STATE_ESTABLISHED);
        assert_eq!(next_state(PROTO_TCP, s, TCP_RST, true), STATE_CLOSED);
    }

    #[test]
    fn only_both_fins_close_a_flow() {
        let t0 = 1_000 * SEC;
        let mut e = entry(STATE_ESTABLISHED, t0);
        e.fin_out = 1;
        assert!(!closing(&e), "half-closed");
        assert_eq!(timeout_ns(&e), TIMEOUT_ESTABLISHED_NS);
        assert!(!expired(&e, t0 + 11 * SEC));
        assert!(!starts_new_flow(PROTO_TCP, &e, t0 + 1, TCP_SYN), "a SYN on a half-closed flow keeps it");
        e.fin_in = 1;
        assert!(closing(&e));
        assert!(expired(&e, t0 + 11 * SEC));
        assert!(starts_new_flow(PROTO_TCP, &e, t0 + 1, TCP_SYN));
        // An entry restored from before the per-direction bytes.
        assert!(closing(&entry(STATE_CLOSING, t0)));
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
        assert!(!expired(&entry(STATE_ESTABLISHED, t0), t0 + TIMEOUT_ESTABLISHED_NS));
        assert!(expired(&entry(STATE_ESTABLISHED, t0), t0 + TIMEOUT_ESTABLISHED_NS + 1));
        assert!(expired(&entry(STATE_SYN_SENT, t0), t0 + 61 * SEC));
        assert!(!expired(&entry(STATE_UDP, t0), t0 + 59 * SEC));
        assert!(expired(&entry(STATE_UDP, t0), t0 + 61 * SEC));
        // A closed tuple reused by a new SYN starts a new flow; an ACK does not.
        assert!(starts_new_flow(PROTO_TCP, &entry(STATE_CLOSED, t0), t0 + 1, TCP_SYN));
        assert!(!starts_new_flow(PROTO_TCP, &entry(STATE_CLOSED, t0), t0 + 1, TCP_ACK));
        assert!(!starts_new_flow(PROTO_TCP, &entry(STATE_ESTABLISHED, t0), t0 + 1, TCP_SYN));
        // A clock that went backwards never expires an entry.
        assert!(!expired(&entry(STATE_SYN_SENT, t0), t0 - SEC));
    }
}
