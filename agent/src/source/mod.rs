// SPDX-License-Identifier: MIT OR Apache-2.0
//! Where the Kubernetes objects come from: the API server ([`kube`]) or a
//! directory of YAML ([`files`]). Both publish whole [`Snapshot`]s on a
//! `tokio::sync::watch` channel; the agent translates the newest one.

use std::{sync::Arc, time::Instant};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

pub mod files;
pub mod kube;

/// Every object the translation needs, at one moment. Objects are shared
/// with the source's stores: a snapshot costs a pointer per object, and an
/// object that did not change is the same `Arc` in the next snapshot (the
/// translator's fast path relies on that).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
    /// Objects that could not be read (file, document, reason).
    pub errors: Vec<String>,
    /// When the change that produced this snapshot was seen (for the
    /// event-to-map latency metric).
    pub changed_at: Option<Instant>,
    /// False until the source has a complete view (the API server's
    /// initial lists); the agent programs nothing before.
    pub synced: bool,
}
