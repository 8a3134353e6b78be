// SPDX-License-Identifier: MIT OR Apache-2.0
//! `xlb agent`: source → translate → map writer, forever.
//!
//! One task owns the [`Datapath`]; everything else talks to it through
//! channels: the source publishes whole snapshots (a `watch` channel keeps
//! only the newest, so a burst of changes costs one sync), the link watcher
//! announces interfaces. The programs stay attached and the maps pinned
//! when the agent exits, for any reason: the datapath keeps forwarding, and
//! the next agent takes over from the pins.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use datapath_common::{
    CFG_F_NEXT_HOP_PER_INGRESS4, CFG_F_NEXT_HOP_PER_INGRESS6, CFG_F_NO_NEXT_HOP_CACHE, CFG_F_SOCK_HOST_ONLY, Config,
};
use futures::StreamExt as _;
use ipnet::IpNet;
use tokio::sync::{mpsc, watch};

use crate::{
    Datapath, MapSizes, attach,
    datapath::{Maps, map_addr},
    health::{Listen, ProxyHealth, ServiceHealth},
    metrics::Http,
    socket_lb,
    source::{self, Snapshot},
    translate::{self, Desired, NodeInfo, Options},
    writer::Writer,
};

/// How often the agent unlinks expired conntrack records.
const CONNTRACK_EXPIRY_PERIOD: Duration = Duration::from_secs(5);
/// Settings of `xlb agent` (see `main.rs` for the flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    /// `--lb-class`: the `spec.loadBalancerClass` whose addresses xlb
    /// allocates (besides Services with none).
    pub lb_class: String,
    /// Which Services are ours (`--service-proxy-name`).
    pub selector: source::Selector,
    pub node_name: String,
    pub node_addresses: Vec<IpAddr>,
    /// `--zone`: this node's zone when no Node object says (or to override it).
    pub zone: Option<String>,
    pub options: Options,
    pub xdp_interfaces: Vec<String>,
    /// Where LoadBalancer addresses are announced (ARP, NDP).
    pub l2_interfaces: Vec<String>,
    pub l2_external_ips: bool,
    /// The L2 Leases' timing (API mode).
    pub l2_lease: crate::lease::Timing,
    /// Where the agent's Leases live (API mode).
    pub namespace: String,
    /// `--l2-rebalance`.
    pub l2_rebalance: bool,
    pub xdp_mode: attach::XdpAttachMode,
    pub tc_interfaces: Vec<String>,
    pub tc_patterns: Vec<glob::Pattern>,
    pub pin_dir: PathBuf,
    /// `--socket-lb`.
    pub socket_lb: socket_lb::Mode,
    /// `--cgroup-path` (None: the node's cgroup2 root).
    pub cgroup_path: Option<PathBuf>,
    pub sizes: MapSizes,
    pub snat_v4: Option<IpAddr>,
    pub snat_v6: Option<IpAddr>,
    pub snat_ports: (u16, u16),
    pub reply_rate: u32,
    pub http_address: Option<SocketAddr>,
    /// kube-proxy's `--healthz-bind-address` (`/healthz`, `/livez`).
    pub healthz_address: Option<SocketAddr>,
    /// How long a change may wait for the maps before `/healthz` fails.
    pub healthz_timeout: Duration,
}

/// Starts the source that publishes snapshots on `tx`; `client` is the
/// API server's, `None` with `--manifests`.
pub fn spawn_source(
    s: &Settings,
    client: Option<kube::Client>,
    tx: watch::Sender<Snapshot>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    match (&s.manifests, client) {
        (Some(dir), _) => {
            let (dir, selector, class) = (dir.clone(), s.selector.clone(), s.lb_class.clone());
            tokio::spawn(source::files::watch_dir(dir, Duration::from_millis(100), selector, class, tx))
        }
        (None, Some(client)) => tokio::spawn(source::kube::run(client, s.selector.clone(), s.lb_class.clone(), tx)),
        (None, None) => tokio::spawn(async { anyhow::bail!("no --manifests and no Kubernetes client") }),
    }
}

/// The API server client, unless the agent reads `--manifests`.
pub async fn client(s: &Settings) -> anyhow::Result<Option<kube::Client>> {
    match s.manifests {
        Some(_) => Ok(None),
        None => Ok(Some(source::kube::client(s.kubeconfig.as_deref()).await.context("Kubernetes client")?)),
    }
}

/// This node: its Node object from the source, plus `--node-address`, and
/// the addresses on its interfaces (`local`).
pub fn node_info(s: &Settings, snap: &Snapshot, local: &[IpAddr]) -> NodeInfo {
    let mut info = snap
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(s.node_name.as_str()))
        .map(|n| NodeInfo::from_node(n))
        .unwrap_or_else(|| NodeInfo { name: s.node_name.clone(), ..NodeInfo::default() });
    if s.zone.is_some() {
        info.zone.clone_from(&s.zone);
    }
    for a in &s.node_addresses {
        if !info.addresses.contains(a) {
            info.addresses.push(*a);
        }
    }
    info.local = local.to_vec();
    info
}

/// Translates a snapshot; problems with the files are reported as problems too.
pub fn desired(s: &Settings, snap: &Snapshot, local: &[IpAddr]) -> Desired {
    desired_with(&mut translate::Translator::default(), s, snap, local)
}

/// [`desired`] through a long-lived translator, which skips the Services
/// that did not change since its last call.
pub fn desired_with(t: &mut translate::Translator, s: &Settings, snap: &Snapshot, local: &[IpAddr]) -> Desired {
    let node = node_info(s, snap, local);
    let mut d = t.translate_shared(&snap.services, &snap.slices, &node, &s.options);
    d.problems.extend(snap.errors.iter().map(|e| translate::Problem { service: String::new(), message: e.clone() }));
    d.problems.extend(
        snap.lb_problems
            .iter()
            .map(|(service, message)| translate::Problem { service: service.clone(), message: message.clone() }),
    );
    d
}

fn config(s: &Settings, node: &NodeInfo, route: &RouteEpoch) -> Config {
    // The agent runs in the node's network namespace: its own is the host's.
    let host_netns = match s.socket_lb {
        socket_lb::Mode::Host => socket_lb::own_netns_cookie().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no netns cookie (SO_NETNS_COOKIE); socket-LB host mode translates nothing");
            u64::MAX
        }),
        _ => 0,
    };
    let pick = |want: Option<IpAddr>, v4: bool| {
        want.or_else(|| {
            node.addresses.iter().chain(&node.local).copied().find(|a| a.is_ipv4() == v4 && !a.is_loopback())
        })
    };
    let a16 = |a: Option<IpAddr>| a.map(map_addr).unwrap_or([0; 16]);
    Config {
        snat_v4: a16(pick(s.snat_v4, true)),
        snat_v6: a16(pick(s.snat_v6, false)),
        snat_port_min: s.snat_ports.0,
        snat_port_max: s.snat_ports.1,
        flags: if s.socket_lb == socket_lb::Mode::Host { CFG_F_SOCK_HOST_ONLY } else { 0 } | route.flags(),
        reply_rate: s.reply_rate,
        route_epoch: route.epoch(),
        host_netns,
    }
}

/// `Config::route_epoch` and the next-hop cache switch, from
/// [`crate::routes::follow`]: the epoch the pinned configuration had when
/// the agent started, plus the route changes seen since (a restarted agent
/// never reuses an epoch the running programs may have cached under).
#[derive(Clone, Copy, Debug, Default)]
struct RouteEpoch {
    base: u32,
    state: crate::routes::RouteState,
}

impl RouteEpoch {
    fn epoch(&self) -> u32 {
        self.base.wrapping_add(1).wrapping_add(self.state.changes)
    }

    /// The next-hop cache's `Config::flags`.
    fn flags(&self) -> u32 {
        let st = &self.state;
        (if st.per_backend { 0 } else { CFG_F_NO_NEXT_HOP_CACHE })
            | (if st.per_ingress4 { CFG_F_NEXT_HOP_PER_INGRESS4 } else { 0 })
            | (if st.per_ingress6 { CFG_F_NEXT_HOP_PER_INGRESS6 } else { 0 })
    }

    const FLAGS: u32 = CFG_F_NO_NEXT_HOP_CACHE | CFG_F_NEXT_HOP_PER_INGRESS4 | CFG_F_NEXT_HOP_PER_INGRESS6;
}

/// An interface appeared or went away.
#[derive(Debug)]
enum LinkEvent {
    Up(String),
    Gone(String),
}

/// Watches rtnetlink link notifications (and lists the links there are).
fn spawn_link_watcher(tx: mpsc::UnboundedSender<LinkEvent>) -> anyhow::Result<()> {
    use rtnetlink::{
        MulticastGroup,
        packet_core::NetlinkPayload,
        packet_route::{
            RouteNetlinkMessage,
            link::{LinkAttribute, LinkMessage},
        },
    };
    fn name(m: &LinkMessage) -> Option<String> {
        m.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
    }
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    tokio::spawn(conn);
    let tx2 = tx.clone();
    tokio::spawn(async move {
        let mut links = handle.link().get().execute();
        while let Some(Ok(m)) = links.next().await {
            if let Some(n) = name(&m) {
                let _ = tx2.send(LinkEvent::Up(n));
            }
        }
        // Keep the handle (and so the connection) alive.
        std::future::pending::<()>().await;
        drop(handle);
    });
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => name(&m).map(LinkEvent::Up),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => name(&m).map(LinkEvent::Gone),
                _ => None,
            };
            if let Some(ev) = ev
                && tx.send(ev).is_err()
            {
                break;
            }
        }
    });
    Ok(())
}

/// What a sync needs besides the datapath: the writer and translator
/// with their memory, and everything a sync reports to.
struct Reconciler<'a> {
    s: &'a Settings,
    writer: Writer,
    translator: translate::Translator,
    health: ServiceHealth,
    proxy_health: std::sync::Arc<ProxyHealth>,
    http: std::sync::Arc<Http>,
    neighbours: crate::neighbours::Neighbours,
    events: Option<crate::events::EventSink>,
    last_config: Option<Config>,
    route: RouteEpoch,
    /// Notices and expected skips already logged (each is said once).
    said_once: std::collections::HashSet<(String, String)>,
    /// L2 announcements of the LoadBalancer addresses this node owns
    /// (`--manifests` mode; with the API server, the Lease task has it).
    l2: Option<crate::l2::Announcer>,
}

impl Reconciler<'_> {
    /// Programs `snap` on a node with the local addresses `local`.
    async fn sync(&mut self, dp: &mut Datapath, snap: &Snapshot, local: &[IpAddr]) -> anyhow::Result<()> {
        let s = self.s;
        let started = Instant::now();
        let node = node_info(s, snap, local);
        let cfg = config(s, &node, &self.route);
        if self.last_config != Some(cfg) {
            dp.set_config(&cfg)?;
            self.last_config = Some(cfg);
        }
        let d = desired_with(&mut self.translator, s, snap, local);
        let translated = started.elapsed();
        let report = self.writer.apply(dp, &d);
        match crate::sweep::sweep(dp, &report) {
            Ok(swept) if swept != Default::default() => {
                tracing::info!(
                    conntrack = swept.conntrack,
                    affinity = swept.affinity,
                    sockets = swept.sockets,
                    "moved flows off stale backends"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping stale conntrack / affinity entries failed"),
        }
        // L2: in `--manifests` mode every agent computes the same owners
        // (see `l2/mod.rs`); with the API server, Leases decide (`l2/leases.rs`).
        if let Some(l2) = self.l2.as_mut() {
            let want = crate::l2::owned(snap, &s.node_name, s.l2_external_ips, &s.lb_class);
            let want = want.into_iter().map(|a| (a, crate::l2::announce::FOREVER)).collect();
            match l2.sync(&want) {
                Ok(gained) if !gained.is_empty() => tracing::info!(?gained, "announcing on L2"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "updating L2 announcements failed"),
            }
        }
        let took = started.elapsed();
        let http = self.http.clone();
        let m = &http.metrics;
        m.syncs.inc();
        m.sync_duration.observe(took.as_secs_f64());
        if let Some(at) = snap.changed_at {
            m.programming_latency.observe(at.elapsed().as_secs_f64());
        }
        m.frontends.set(self.writer.len() as i64);
        m.problems.set((d.problems.len() + report.failed.len()) as i64);
        if !report.failed.is_empty() {
            m.sync_failures.inc();
        }
        self.log(&d, &report.failed);
        if let Some(ev) = self.events.as_mut() {
            use crate::events::Origin;
            ev.publish(snap, &d.problems, Origin::Cluster);
            ev.publish(snap, &report.failed, Origin::Node);
        }
        self.proxy_health.updated(snap.changed_at);
        let listen = if s.options.nodeports_everywhere() {
            Listen::All
        } else {
            Listen::On(node.nodeport_addresses(&s.options))
        };
        self.health.sync(&d.health_checks, &listen).await;
        // Remote backends' next hops: resolved before the first packet needs them.
        let remote = d.frontends.iter().flat_map(|f| f.backends.iter()).filter(|b| !b.node_local).map(|b| b.address);
        self.neighbours.ensure(remote).await;
        self.http.ready.store(true, Ordering::Relaxed);
        let quiet = report.changed + report.removed + report.failed.len() == 0 && m.syncs.get() > 1;
        if !quiet {
            tracing::info!(
                services = snap.services.len(),
                frontends = self.writer.len(),
                changed = report.changed,
                removed = report.removed,
                backends_written = report.backends_written,
                backends_removed = report.backends_removed,
                failed = report.failed.len(),
                micros = took.as_micros() as u64,
                translate_micros = translated.as_micros() as u64,
                "synced"
            );
        }
        Ok(())
    }

    /// Problems every sync; notices (warn) and expected skips (debug) once.
    fn log(&mut self, d: &Desired, failed: &[translate::Problem]) {
        for p in &d.problems {
            tracing::warn!(service = %p.service, "{}", p.message);
        }
        for p in &d.notices {
            if self.said_once.insert((p.service.clone(), p.message.clone())) {
                tracing::warn!(service = %p.service, "{}", p.message);
            }
        }
        for p in &d.skipped {
            if self.said_once.insert((p.service.clone(), p.message.clone())) {
                tracing::debug!(service = %p.service, "{}", p.message);
            }
        }
        for p in failed {
            tracing::error!(service = %p.service, "{}", p.message);
        }
    }
}

/// Loads the programs against the pinned maps and attaches (or swaps)
/// them on the configured interfaces.
fn load_and_attach(s: &Settings) -> anyhow::Result<Datapath> {
    attach::prepare_pin_dir(&s.pin_dir)?;
    let mut dp = Datapath::load_pinned(s.sizes, Some(&s.pin_dir)).context("loading the datapath")?;
    dp.load_programs().context("verifying the programs")?;
    attach::pin_programs(&mut dp, &s.pin_dir)?;
    // An older xlb's LRU conntrack: its flows copied into the table while
    // its programs still run, and again (the pin removed) once ours do.
    copy_lru_conntrack(&dp, &s.pin_dir, false);
    let (services, backends) = dp.recover()?;
    if services + backends > 0 {
        tracing::info!(services, backends, "continuing from the pinned maps");
    }
    for ifname in &s.xdp_interfaces {
        let how = attach::xdp(&mut dp, &s.pin_dir, ifname, s.xdp_mode).with_context(|| format!("XDP on {ifname}"))?;
        tracing::info!(ifname, ?how, "XDP attached");
    }
    for ifname in &s.tc_interfaces {
        let how = attach::tc_ingress(&mut dp, &s.pin_dir, ifname).with_context(|| format!("TC on {ifname}"))?;
        tracing::info!(ifname, ?how, "TC attached");
    }
    match s.socket_lb {
        socket_lb::Mode::Off => {
            let n = socket_lb::detach_except(&s.pin_dir, None);
            if n > 0 {
                tracing::info!(links = n, "socket-level load balancing off: detached");
            }
        }
        mode => {
            let cgroup = socket_lb::cgroup_path(s.cgroup_path.as_deref())?;
            let done = socket_lb::attach(&mut dp, &s.pin_dir, &cgroup)
                .with_context(|| format!("socket-level load balancing on {}", cgroup.display()))?;
            let updated = done.iter().filter(|(_, a)| *a == socket_lb::Attached::Updated).count();
            tracing::info!(cgroup = %cgroup.display(), ?mode, hooks = done.len(), updated, "socket-LB attached");
        }
    }
    // Only now: the pinned links run the new programs (see `pin_tail_calls`).
    dp.pin_tail_calls(&s.pin_dir).context("pinning the tail-call tables")?;
    copy_lru_conntrack(&dp, &s.pin_dir, true);
    Ok(dp)
}

/// [`Datapath::copy_lru_conntrack`], logged.
fn copy_lru_conntrack(dp: &Datapath, pin_dir: &std::path::Path, remove: bool) {
    match dp.copy_lru_conntrack(pin_dir, remove) {
        Ok(Some(m)) => tracing::info!(
            flows = m.flows,
            present = m.present,
            dropped = m.dropped,
            removed = remove,
            "copied the flows of an older xlb's LRU conntrack into the conntrack table"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not copy the flows of an older xlb's LRU conntrack"),
    }
}

/// Starts kube-proxy's health server and the metrics server.
fn spawn_http(s: &Settings) -> (std::sync::Arc<ProxyHealth>, std::sync::Arc<Http>) {
    let proxy_health = ProxyHealth::new(s.healthz_timeout);
    if let Some(addr) = s.healthz_address {
        let h = proxy_health.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::health::serve_proxy_health(addr, h).await {
                tracing::error!(%addr, error = %e, "health server failed");
            }
        });
    }
    let http = Http::new(Maps::open_pinned(&s.pin_dir).ok(), proxy_health.clone());
    if let Some(addr) = s.http_address {
        let h = http.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, h).await {
                tracing::error!(%addr, error = %e, "HTTP server failed");
            }
        });
    }
    (proxy_health, http)
}

/// Runs the agent until SIGINT / SIGTERM.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    let mut dp = load_and_attach(&s)?;
    let writer = Writer::recover(&dp);
    let translator = translate::Translator::default();
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    if !s.tc_patterns.is_empty() {
        spawn_link_watcher(link_tx).context("watching links")?;
    }
    let (proxy_health, http) = spawn_http(&s);
    let (tx, mut rx) = watch::channel(Snapshot::default());
    // Changes count as queued when the source publishes them, apart from
    // this loop, so a loop that stops syncing shows on /healthz.
    tokio::spawn(proxy_health.clone().watch(rx.clone(), s.node_name.clone()));
    // The node's own addresses (NodePorts open on them), followed.
    let (addr_tx, mut addr_rx) = watch::channel(Vec::new());
    crate::addresses::follow(addr_tx).await.context("listing the node's addresses")?;
    // Route, rule and neighbour changes, for the next-hop cache.
    // Without them (an error here), next hops are not cached at all.
    let (route_tx, mut route_rx) = watch::channel(crate::routes::RouteState::default());
    if let Err(e) = crate::routes::follow(route_tx).await {
        tracing::warn!(error = %e, "cannot follow routes and neighbours: every new flow looks its route up");
    }
    let client = client(&s).await?;
    let events = client.clone().map(|c| crate::events::EventSink::new(c, &s.node_name));
    let announcer = crate::l2::Announcer::new(
        s.l2_interfaces.clone(),
        dp.l2_map().map_err(|e| tracing::warn!(error = %e, "no L2_ADDRS: no L2 announcements")).ok(),
    );
    // API mode: the allocator's election and the L2 Leases, stopped (and
    // their Leases released) before the agent exits.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut leaders = Vec::new();
    let announcer = match &client {
        Some(c) => {
            let identity = crate::lease::identity(&s.node_name);
            tracing::info!(
                identity,
                namespace = s.namespace,
                "standing for the allocator's and the L2 addresses' Leases"
            );
            leaders.push(tokio::spawn(crate::lbipam::leader::run(
                c.clone(),
                s.namespace.clone(),
                identity.clone(),
                s.lb_class.clone(),
                http.metrics.leases.clone(),
                rx.clone(),
                stop_rx.clone(),
            )));
            let l2 = crate::l2::leases::Settings {
                namespace: s.namespace.clone(),
                identity,
                timing: s.l2_lease,
                external_ips: s.l2_external_ips,
                lb_class: s.lb_class.clone(),
                rebalance: s.l2_rebalance,
                metrics: http.metrics.leases.clone(),
            };
            leaders.push(tokio::spawn(crate::l2::leases::run(c.clone(), l2, announcer, rx.clone(), stop_rx)));
            None
        }
        None => Some(announcer),
    };
    let mut source = spawn_source(&s, client, tx);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut r = Reconciler {
        s: &s,
        writer,
        translator,
        health: ServiceHealth::new(proxy_health.clone()),
        proxy_health,
        http,
        neighbours: crate::neighbours::Neighbours::default(),
        events,
        last_config: None,
        route: RouteEpoch { base: dp.config().map(|c| c.route_epoch).unwrap_or(0), state: *route_rx.borrow() },
        said_once: Default::default(),
        l2: announcer,
    };
    let mut last: Option<Snapshot> = None;
    // Health-check servers that could not bind are retried (kube-proxy: at
    // each periodic sync).
    let mut retry = tokio::time::interval(Duration::from_secs(30));
    // Expired conntrack records are unlinked here, not only when a new flow
    // needs their way: their backends' active counts drop and their SNAT
    // ports are free without a packet arriving.
    let mut expire = tokio::time::interval(CONNTRACK_EXPIRY_PERIOD);
    loop {
        tokio::select! {
            _ = retry.tick() => r.health.retry().await,
            _ = expire.tick() => {
                let n = dp.conntrack_expire();
                if n > 0 {
                    tracing::debug!(flows = n, "expired conntrack records unlinked");
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let snap = rx.borrow_and_update().clone();
                if !snap.synced {
                    continue;
                }
                let local = addr_rx.borrow_and_update().clone();
                r.sync(&mut dp, &snap, &local).await?;
                last = Some(snap);
            }
            Ok(()) = addr_rx.changed() => {
                let local = addr_rx.borrow_and_update().clone();
                if let Some(snap) = &last {
                    r.sync(&mut dp, snap, &local).await?;
                }
            }
            Ok(()) = route_rx.changed() => {
                r.route.state = *route_rx.borrow_and_update();
                if let Some(mut cfg) = r.last_config {
                    cfg.route_epoch = r.route.epoch();
                    cfg.flags = (cfg.flags & !RouteEpoch::FLAGS) | r.route.flags();
                    match dp.set_config(&cfg) {
                        Ok(()) => r.last_config = Some(cfg),
                        Err(e) => tracing::warn!(error = %e, "writing the route epoch failed"),
                    }
                }
            }
            Some(ev) = link_rx.recv() => match ev {
                LinkEvent::Up(ifname) if attach::matches(&s.tc_patterns, &ifname) && !s.tc_interfaces.contains(&ifname) => {
                    match attach::tc_ingress(&mut dp, &s.pin_dir, &ifname) {
                        Ok(how) => tracing::info!(ifname, ?how, "TC attached (pattern match)"),
                        Err(e) => tracing::warn!(ifname, error = %e, "attaching TC failed"),
                    }
                }
                LinkEvent::Gone(ifname) => {
                    attach::forget_interface(&s.pin_dir, &ifname);
                    tracing::info!(ifname, "interface gone");
                }
                LinkEvent::Up(_) => {}
            },
            res = &mut source => {
                // The source ended: keep the datapath as it is and stop.
                match res {
                    Ok(Ok(())) => tracing::warn!("source ended"),
                    Ok(Err(e)) => tracing::error!(error = %e, "source failed"),
                    Err(e) => tracing::error!(error = %e, "source panicked"),
                }
                anyhow::bail!("the source stopped; the datapath keeps its last state");
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Stop answering on L2 and give the Leases up, so others take over now.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), futures::future::join_all(leaders)).await;
    tracing::info!("exiting; programs stay attached and maps pinned under {}", s.pin_dir.display());
    Ok(())
}

/// Parses a duration: `500ms`, `2s`, `1m` (a bare number is seconds).
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: the unit is ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Parses `a-b` into a port range.
pub fn port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 1 ≤ FIRST ≤ LAST"));
    }
    Ok((a, b))
}

/// Parses a CIDR (a bare address is a /32 or /128).
pub fn cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).map_err(|e| format!("{s:?}: {e}"))
}
