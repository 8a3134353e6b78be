// SPDX-License-Identifier: MIT OR Apache-2.0
//! Leases (`coordination.k8s.io/v1`): the LoadBalancer allocator's leader
//! and the owner of each L2-announced address (issue #15). kube-rs has no
//! leader election and no maintained crate supports kube 5
//! (`docs/design/lb-leases.md` §5), so this is client-go's
//! `tryAcquireOrRenew` (`tools/leaderelection/leaderelection.go`) on
//! `Api<Lease>`, with two changes for L2 ownership:
//!
//! - **Time is only ever local** (as client-go): a candidate counts a
//!   Lease's duration from when *it* first saw the record's
//!   resourceVersion, never from `renewTime`, so clock offsets between
//!   nodes do not matter. The holder counts from when it *sent* its last
//!   successful write, which is before the write committed and so before
//!   any candidate saw it: the holder's hold ([`Held::until`]) ends
//!   `margin` before any candidate may take over (`docs/design/lb-leases.md`
//!   §7.2 gives the argument; the margin absorbs clock *rate* error).
//! - **Writes are fenced by resourceVersion**: every write is a replace of
//!   the object last read or written, so of two candidates racing for one
//!   free Lease one gets 409 Conflict, and a holder whose Lease was taken
//!   learns it from the 409 of its next renewal.
//!
//! A free Lease (absent, released: no holder, or expired) may be taken
//! after a per-candidate delay (the caller's rank), which spreads L2
//! owners as rendezvous hashing ranks the nodes.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};

/// Now, on CLOCK_BOOTTIME, in nanoseconds: the clock the XDP program's
/// `bpf_ktime_get_boot_ns()` reads, so a hold's end can be written into
/// L2_ADDRS as is. (BOOTTIME counts a suspend; MONOTONIC would not.)
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// A Lease's timing: `duration` is written as `leaseDurationSeconds`
/// (whole seconds, at least 1); the holder renews every `renew` and holds
/// until `duration − margin` after its last successful write was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub duration: Duration,
    pub renew: Duration,
    pub margin: Duration,
}

impl Timing {
    /// The L2 defaults: a 2 s Lease renewed every 0.5 s, held for 1.75 s
    /// after each renewal's send (3 tries before it lapses). Failover after
    /// a crash takes 1.5–2.1 s plus a watch event's latency.
    pub const L2: Timing = Timing {
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(500),
        margin: Duration::from_millis(250),
    };
    /// The allocator leader's: client-go's defaults (15 s, renewed every
    /// 2 s); allocation is not latency-bound.
    pub const ALLOCATOR: Timing =
        Timing { duration: Duration::from_secs(15), renew: Duration::from_secs(2), margin: Duration::from_secs(3) };

    /// Checks what the flags gave: whole seconds, renewals that fit in the hold.
    pub fn check(self) -> Result<Self, String> {
        if self.duration.as_secs() == 0 || self.duration.subsec_nanos() != 0 {
            return Err(format!("the lease duration must be whole seconds, at least 1 (got {:?})", self.duration));
        }
        if self.renew.is_zero() || self.renew + self.margin >= self.duration {
            return Err(format!(
                "the renew interval ({:?}) plus the margin ({:?}) must be below the lease duration ({:?})",
                self.renew, self.margin, self.duration
            ));
        }
        Ok(self)
    }

    fn seconds(self) -> i32 {
        self.duration.as_secs().max(1) as i32
    }
}

/// This candidate holds the Lease until `until` (boot ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub until: u64,
    /// When the last successful write was sent (boot ns).
    pub sent: u64,
}

/// What a candidate knows of one Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// Held by us.
    Held(Held),
    /// Held by another (live by our observation).
    Other(String),
    /// Free since (boot ns): absent, released or expired.
    Free(u64),
}

/// What a step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to write yet.
    Idle,
    /// Taken (from another holder, an empty one, or created).
    Acquired(Held),
    Renewed(Held),
    /// Our hold ended: taken by another (409), or not renewed in time.
    Lost,
    /// A write failed; `Held` if we still hold (until it runs out).
    Failed(String),
}

/// One Lease as one candidate sees it.
pub struct Elector {
    api: Api<Lease>,
    pub name: String,
    identity: String,
    timing: Timing,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
    /// The Lease as last read or written: its resourceVersion is the next
    /// write's precondition.
    last: Option<Lease>,
    /// When `last`'s resourceVersion (or the Lease's absence) was first seen.
    observed_at: u64,
    held: Option<Held>,
    /// No take before this (boot ns): a failed write backs off.
    retry_at: u64,
}

fn rv(l: Option<&Lease>) -> Option<&str> {
    l.and_then(|l| l.metadata.resource_version.as_deref())
}

fn holder(l: &Lease) -> Option<&str> {
    l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty())
}

/// The annotation by which a candidate asks the holder for a Lease.
/// (Not `spec.preferredHolder`: API servers drop that field unless the
/// CoordinatedLeaderElection feature gate is on, and refuse it without
/// `spec.strategy`.)
pub const PREFERRED_HOLDER_ANNOTATION: &str = "xlb.io/preferred-holder";

fn preferred(l: &Lease) -> Option<&str> {
    l.metadata.annotations.as_ref()?.get(PREFERRED_HOLDER_ANNOTATION).map(String::as_str).filter(|h| !h.is_empty())
}

/// The node part of an identity (`node/instance`).
pub fn node_of(identity: &str) -> &str {
    identity.split_once('/').map_or(identity, |(n, _)| n)
}

/// An identity for this process on `node`: `node/<instance>`, unique per
/// agent process, so a second agent on one node (a surge rollout, a stuck
/// old pod) is another candidate, never taken for this one.
pub fn identity(node: &str) -> String {
    let mut b = [0u8; 4];
    // SAFETY: a valid buffer of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let r = if n == 4 { u32::from_ne_bytes(b) } else { std::process::id() ^ boot_ns() as u32 };
    format!("{node}/{r:08x}")
}

impl Elector {
    pub fn new(api: Api<Lease>, name: String, identity: String, timing: Timing) -> Self {
        Self {
            api,
            name,
            identity,
            timing,
            labels: Default::default(),
            annotations: Default::default(),
            last: None,
            observed_at: boot_ns(),
            held: None,
            retry_at: 0,
        }
    }

    /// Labels and annotations put on a Lease this candidate creates.
    pub fn with_metadata(
        mut self,
        labels: std::collections::BTreeMap<String, String>,
        annotations: std::collections::BTreeMap<String, String>,
    ) -> Self {
        self.labels = labels;
        self.annotations = annotations;
        self
    }

    pub fn held(&self) -> Option<Held> {
        self.held
    }

    /// Takes in the Lease as now seen (`None`: absent), from a watch or a
    /// read. A holder ignores it (a watch may lag behind its own writes;
    /// a taker shows up as its next renewal's 409).
    pub fn observe(&mut self, seen: Option<&Lease>, now: u64) {
        if self.held.is_some() {
            return;
        }
        if rv(seen) != rv(self.last.as_ref()) {
            self.last = seen.cloned();
            self.observed_at = now;
        }
    }

    /// The holder of the record last observed, if any (and not expired).
    pub fn view(&self, now: u64) -> View {
        if let Some(h) = self.held {
            return View::Held(h);
        }
        let Some(l) = &self.last else { return View::Free(self.observed_at) };
        let Some(who) = holder(l) else { return View::Free(self.observed_at) };
        let secs = l.spec.as_ref().and_then(|s| s.lease_duration_seconds).unwrap_or(1).max(1) as u64;
        let expires = self.observed_at + secs * 1_000_000_000;
        if now >= expires {
            return View::Free(expires);
        }
        if who == self.identity {
            return match preferred(l) {
                // Ours, but another asked for it: it is to take it once we
                // have released it.
                Some(p) if p != self.identity => View::Other(p.to_string()),
                // Ours from before a restart: renew it at once (client-go).
                _ => View::Free(self.observed_at),
            };
        }
        View::Other(who.to_string())
    }

    /// The record names us as holder but another as preferred holder: we
    /// are to give it up (after we stopped acting on it).
    pub fn asked_to_yield(&self) -> bool {
        self.held.is_none()
            && self.last.as_ref().is_some_and(|l| {
                holder(l) == Some(self.identity.as_str()) && preferred(l).is_some_and(|p| p != self.identity)
            })
    }

    /// The preferred holder recorded in the last observed Lease.
    pub fn recorded_preferred(&self) -> Option<&str> {
        self.last.as_ref().and_then(preferred)
    }

    /// Asks the live holder to hand the Lease over (as coordinated leader
    /// election's `spec.preferredHolder`, by annotation): a replace of the
    /// observed record naming us. The holder's next renewal then gets 409;
    /// it stops acting, reads the record and releases; we take it at once.
    pub async fn prefer(&mut self, timeout: Duration) -> bool {
        if self.held.is_some() {
            return false;
        }
        let Some(mut lease) = self.last.clone() else { return false };
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(PREFERRED_HOLDER_ANNOTATION.into(), self.identity.clone());
        let pp = PostParams::default();
        match tokio::time::timeout(timeout, self.api.replace(&self.name, &pp, &lease)).await {
            Ok(Ok(l)) => {
                self.last = Some(l);
                self.observed_at = boot_ns();
                true
            }
            _ => false,
        }
    }

    /// The holder recorded in the last observed Lease (expired or not).
    pub fn recorded_holder(&self) -> Option<&str> {
        self.last.as_ref().and_then(holder)
    }

    /// One step: renew when held and due; take when free for `delay` and
    /// `may_take`. A write is bounded by `timeout`.
    pub async fn step(&mut self, may_take: bool, delay: Duration, timeout: Duration) -> Step {
        let now = boot_ns();
        match self.view(now) {
            View::Held(h) => {
                if now >= h.until {
                    self.lose();
                    return Step::Lost;
                }
                if now < h.sent + ns(self.timing.renew) {
                    return Step::Idle;
                }
                // A write must not outlive the hold: its success would
                // extend a hold that had already ended here.
                let left = Duration::from_nanos(h.until - now);
                match self.write(true, timeout.min(left)).await {
                    Ok(h) => Step::Renewed(h),
                    Err(e) if e.conflict => {
                        // Taken, asked for, or our own earlier renewal
                        // that timed out here but committed: read which.
                        let left = Duration::from_nanos(h.until.saturating_sub(boot_ns()));
                        let seen = self.read(timeout.min(left)).await;
                        let ours_alone = seen.as_ref().is_some_and(|l| {
                            holder(l) == Some(self.identity.as_str()) && preferred(l).is_none_or(|p| p == self.identity)
                        });
                        if ours_alone && boot_ns() < h.until {
                            // Still ours: renew from that record (the hold
                            // stays the one last acknowledged).
                            self.last = seen;
                            return Step::Failed(e.message);
                        }
                        self.lose();
                        if let Some(l) = seen {
                            self.observe(Some(&l), boot_ns());
                        }
                        Step::Lost
                    }
                    Err(e) => {
                        if boot_ns() >= h.until {
                            self.lose();
                            Step::Lost
                        } else {
                            Step::Failed(e.message)
                        }
                    }
                }
            }
            View::Other(_) => Step::Idle,
            View::Free(since) => {
                if !may_take || now < since + ns(delay) || now < self.retry_at {
                    return Step::Idle;
                }
                match self.write(false, timeout).await {
                    Ok(h) => Step::Acquired(h),
                    Err(e) => {
                        if !e.conflict {
                            // client-go retries every RetryPeriod with jitter.
                            let jitter = boot_ns() % (ns(self.timing.renew) / 5 + 1);
                            self.retry_at = boot_ns() + ns(self.timing.renew) + jitter;
                        }
                        Step::Failed(e.message)
                    }
                }
            }
        }
    }

    fn lose(&mut self) {
        self.held = None;
        // Forget the record: the next observation is taken as new.
        self.last = None;
        self.observed_at = boot_ns();
    }

    /// Writes this candidate as holder: a replace of the last record
    /// (`renewal`: keep acquireTime and transitions), or a create.
    async fn write(&mut self, renewal: bool, timeout: Duration) -> Result<Held, WriteError> {
        let sent = boot_ns();
        let now = MicroTime(Timestamp::now());
        let mut lease = self.last.clone().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels.clone()).filter(|l| !l.is_empty()),
                annotations: Some(self.annotations.clone()).filter(|a| !a.is_empty()),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        let exists = lease.metadata.resource_version.is_some();
        if !renewal && let Some(a) = lease.metadata.annotations.as_mut() {
            a.remove(PREFERRED_HOLDER_ANNOTATION);
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        let previous = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if !renewal && previous.as_deref() != Some(self.identity.as_str()) {
            // As client-go: a new holder is a transition (from a released
            // Lease too); a created Lease starts at 0.
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(exists));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.timing.seconds());
        spec.renew_time = Some(now);
        let create = lease.metadata.resource_version.is_none();
        let pp = PostParams::default();
        let call = async {
            if create { self.api.create(&pp, &lease).await } else { self.api.replace(&self.name, &pp, &lease).await }
        };
        let res = tokio::time::timeout(timeout, call).await;
        match res {
            Ok(Ok(written)) => {
                let held = Held { until: sent + ns(self.timing.duration) - ns(self.timing.margin), sent };
                self.last = Some(written);
                self.observed_at = boot_ns();
                self.held = Some(held);
                Ok(held)
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                // Another wrote first: re-read before trying again (a
                // holder reads in `step`, after deciding about its hold).
                if !renewal {
                    self.refresh(timeout).await;
                }
                Err(WriteError { conflict: true, message: s.message.clone() })
            }
            Ok(Err(e)) => Err(WriteError { conflict: false, message: e.to_string() }),
            Err(_) => Err(WriteError { conflict: false, message: format!("no answer within {timeout:?}") }),
        }
    }

    /// Reads the Lease again (after a conflict), within `timeout`.
    pub async fn refresh(&mut self, timeout: Duration) {
        if let Ok(Ok(seen)) = tokio::time::timeout(timeout, self.api.get_opt(&self.name)).await {
            self.observe(seen.as_ref(), boot_ns());
        }
    }

    /// The Lease as stored now (`None`: absent or unreadable in `timeout`).
    async fn read(&self, timeout: Duration) -> Option<Lease> {
        tokio::time::timeout(timeout, self.api.get_opt(&self.name)).await.ok()?.ok()?
    }

    /// Gives the Lease up (client-go's ReleaseOnCancel): no holder, a 1 s
    /// duration, so candidates take it at once. The caller has stopped
    /// acting on it *before* (for L2: the L2_ADDRS entry is gone).
    pub async fn release(&mut self, timeout: Duration) {
        let ours = self.held.take().is_some() || self.asked_to_yield();
        if !ours {
            return;
        }
        let Some(mut lease) = self.last.take() else { return };
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let res = tokio::time::timeout(timeout, self.api.replace(&self.name, &PostParams::default(), &lease)).await;
        match res {
            Ok(Ok(l)) => self.last = Some(l),
            Ok(Err(e)) => tracing::debug!(lease = %self.name, error = %e, "releasing the lease failed; it will expire"),
            Err(_) => tracing::debug!(lease = %self.name, "releasing the lease timed out; it will expire"),
        }
        self.observed_at = boot_ns();
    }
}

struct WriteError {
    conflict: bool,
    message: String,
}
