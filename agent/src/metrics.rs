// SPDX-License-Identifier: MIT OR Apache-2.0
//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` on the
//! metrics port (kube-proxy's health services are in [`crate::health`]).
//!
//! Datapath counters are read from the pinned maps at scrape time (a
//! [`Collector`]), so a scrape always shows the kernel's current numbers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use datapath_common::verdict;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, gauge::ConstGauge, gauge::Gauge, histogram::Histogram,
    },
    registry::Registry,
};

use crate::{datapath::Maps, health::ProxyHealth};

/// The agent's own metrics, updated by the reconcile loop.
#[derive(Debug)]
pub struct Metrics {
    pub syncs: Counter,
    pub sync_failures: Counter,
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    pub frontends: Gauge,
    pub problems: Gauge,
    pub leases: LeaseMetrics,
}

/// The Lease tasks' metrics (API mode): handed to them as clones.
#[derive(Clone, Debug, Default)]
pub struct LeaseMetrics {
    /// Addresses this node answers ARP / NDP for now.
    pub l2_answered: Gauge,
    pub l2_acquired: Counter,
    pub l2_lost: Counter,
    /// 1 while this agent leads the LoadBalancer address allocation.
    pub allocator_leader: Gauge,
    pub status_writes: Counter,
}

fn buckets() -> impl Iterator<Item = f64> {
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0].into_iter()
}

impl Metrics {
    fn new(registry: &mut Registry) -> Self {
        let m = Self {
            syncs: Counter::default(),
            sync_failures: Counter::default(),
            sync_duration: Histogram::new(buckets()),
            programming_latency: Histogram::new(buckets()),
            frontends: Gauge::default(),
            problems: Gauge::default(),
            leases: LeaseMetrics::default(),
        };
        let l = &m.leases;
        registry.register(
            "xlb_l2_answered_addresses",
            "LoadBalancer addresses this node answers ARP / NDP for",
            l.l2_answered.clone(),
        );
        registry.register("xlb_l2_leases_acquired", "L2 address Leases this agent took", l.l2_acquired.clone());
        registry.register(
            "xlb_l2_leases_lost",
            "L2 address Leases this agent lost (taken over, or not renewed in time)",
            l.l2_lost.clone(),
        );
        registry.register(
            "xlb_lb_allocator_leader",
            "1 while this agent leads the LoadBalancer address allocation",
            l.allocator_leader.clone(),
        );
        registry.register(
            "xlb_lb_status_writes",
            "LoadBalancer statuses written by this agent as the allocator's leader",
            l.status_writes.clone(),
        );
        registry.register("xlb_syncs", "Reconciliations of the datapath with the source", m.syncs.clone());
        registry.register(
            "xlb_sync_failures",
            "Reconciliations in which at least one frontend could not be programmed",
            m.sync_failures.clone(),
        );
        registry.register("xlb_sync_duration_seconds", "Time to translate and write the maps", m.sync_duration.clone());
        registry.register(
            "xlb_programming_latency_seconds",
            "Time from seeing a change in the source to the maps holding it",
            m.programming_latency.clone(),
        );
        registry.register("xlb_frontends", "Frontends programmed", m.frontends.clone());
        registry.register("xlb_problems", "Services or ports skipped or failed in the last sync", m.problems.clone());
        m
    }
}

/// `<prefix>_packets` and `<prefix>_bytes` counters from per-label {packets, bytes}.
fn encode_counters<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    what: &str,
    stats: &[(L, datapath_common::Counter)],
) -> Result<(), std::fmt::Error> {
    for (unit, bytes) in [("packets", false), ("bytes", true)] {
        let name = format!("{prefix}_{unit}");
        let help = format!("{}{} {what}", unit[..1].to_uppercase(), &unit[1..]);
        let mut m = encoder.encode_descriptor(&name, &help, None, MetricType::Counter)?;
        for (labels, c) in stats {
            ConstCounter::new(if bytes { c.bytes } else { c.packets }).encode(m.encode_family(labels)?)?;
        }
    }
    Ok(())
}

/// Reads the datapath counters from the maps on every scrape.
#[derive(Debug)]
struct MapCollector {
    maps: Mutex<Maps>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps")
    }
}

impl Collector for MapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(v) = maps.verdicts() {
            let mut m = encoder.encode_descriptor(
                "xlb_packets_by_verdict",
                "Packets seen by the programs, by verdict reason",
                None,
                MetricType::Counter,
            )?;
            for (i, n) in v.iter().enumerate() {
                let labels = [("reason", verdict::NAMES[i])];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        let names: HashMap<u32, (String, String, &str, &str)> = maps
            .frontends()
            .into_iter()
            .map(|(id, i)| {
                let name = String::from_utf8_lossy(&i.name[..i.name_len as usize]).into_owned();
                let kind = crate::translate::Kind::from_number(i.kind).map(|k| k.name()).unwrap_or("?");
                // One address can have a frontend per scope (a Local
                // Service's external address as pods see it).
                let scope = if i.key.scope == datapath_common::SCOPE_INTERNAL { "internal" } else { "external" };
                (id, (name, crate::dump::frontend_addr(&i.key), kind, scope))
            })
            .collect();
        let mut stats = Vec::new();
        for (id, (name, addr, kind, scope)) in &names {
            if let Ok(c) = maps.service_stats(*id) {
                let labels = [
                    ("service", name.clone()),
                    ("frontend", addr.clone()),
                    ("kind", kind.to_string()),
                    ("scope", scope.to_string()),
                ];
                stats.push((labels, c));
            }
        }
        encode_counters(&mut encoder, "xlb_service", "load-balanced per frontend", &stats)?;
        let mut bstats = Vec::new();
        for (id, b) in maps.backends() {
            if let Ok(c) = maps.backend_stats(id) {
                bstats.push(([("backend", crate::dump::addr_port(&b.addr, b.port))], c));
            }
        }
        encode_counters(&mut encoder, "xlb_backend", "sent to each backend", &bstats)?;
        let ct = maps.conntrack_len() as i64;
        let m = encoder.encode_descriptor(
            "xlb_conntrack_entries",
            "Entries in the conntrack table (two per flow: its original and reply tuples)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(ct).encode(m)?;
        let table = maps.conntrack_table();
        let m = encoder.encode_descriptor(
            "xlb_conntrack_capacity_flows",
            "Flows the conntrack table holds at most (both address families)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(table.capacity() as i64).encode(m)?;
        let mut m = encoder.encode_descriptor(
            "xlb_conntrack_events",
            "Conntrack table events: evictions by class (expired, unestablished) and insert failures \
             (full bucket, full reply bucket, busy lock, reply tuple taken over)",
            None,
            MetricType::Counter,
        )?;
        for (name, n) in datapath_common::ct_table::event::NAMES.iter().zip(table.events()) {
            ConstCounter::new(n).encode(m.encode_family(&[("event", *name)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "xlb_backend_active_connections",
            "Established TCP connections per backend through this node (conntrack's count)",
            None,
            MetricType::Gauge,
        )?;
        for (id, b) in maps.backends() {
            let n = table.connections(id) as i64;
            ConstGauge::new(n).encode(m.encode_family(&[("backend", crate::dump::addr_port(&b.addr, b.port))])?)?;
        }
        Ok(())
    }
}

/// Shared state of the HTTP endpoints.
#[derive(Debug)]
pub struct Http {
    registry: Registry,
    pub metrics: Metrics,
    /// Set after the first complete sync.
    pub ready: AtomicBool,
    /// The proxy's health, as `/livez` on the health port reports it.
    pub health: Arc<ProxyHealth>,
}

impl Http {
    /// Metrics on the agent and on the maps pinned under `pin_dir`.
    pub fn new(maps: Option<Maps>, health: Arc<ProxyHealth>) -> Arc<Self> {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        if let Some(maps) = maps {
            registry.register_collector(Box::new(MapCollector { maps: Mutex::new(maps) }));
        }
        Arc::new(Self { registry, metrics, ready: AtomicBool::new(false), health })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

async fn metrics(State(s): State<Arc<Http>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], s.render())
}

async fn healthz(State(s): State<Arc<Http>>) -> impl IntoResponse {
    if s.health.is_healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "a change has waited too long to reach the maps\n")
    }
}

async fn readyz(State(s): State<Arc<Http>>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`.
pub async fn serve(addr: SocketAddr, state: Arc<Http>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
