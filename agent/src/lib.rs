// SPDX-License-Identifier: MIT OR Apache-2.0
//! The user-space side of xlb: loading the datapath, writing its maps, and
//! the pure decision logic (Maglev, backend selection) the agent and the
//! tests share with the kernel programs.

pub mod addresses;
pub mod agent;
pub mod attach;
pub mod cli;
pub mod ct_table;
pub mod datapath;
pub mod dump;
pub mod events;
pub mod filter;
pub mod health;
pub mod l2;
pub mod lbipam;
pub mod lease;
pub mod maglev;
pub mod mapped;
pub mod metrics;
pub mod neighbours;
pub mod pktgen;
pub mod region;
pub mod routes;
pub mod select;
pub mod sequence;
pub mod sock_diag;
pub mod socket_lb;
pub mod source;
pub mod sweep;
pub mod translate;
pub mod writer;

pub use datapath::{Datapath, Error, MapSizes, ServiceSpec};
