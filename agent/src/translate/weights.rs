// SPDX-License-Identifier: MIT OR Apache-2.0
//! `xlb.io/weights`: per-endpoint weights of one Service.
//!
//! The format is `key=weight` entries separated by commas or white space
//! (so a YAML block scalar with one entry per line works too), the key an
//! endpoint's pod name (EndpointSlice `targetRef.name`) or its address, the
//! weight an integer 0–65535:
//!
//! ```text
//! xlb.io/weights: "web-0=3, web-1=1, 10.0.0.7=0"
//! ```
//!
//! An address entry wins over a name entry for the same endpoint; an
//! endpoint named nowhere weighs 1. A bad entry is reported and left out
//! (its endpoint weighs 1); the other entries stand. A name that matches
//! no endpoint is not a problem (the pod may be gone, or on another port).

use std::{collections::BTreeMap, net::IpAddr};

use super::{WEIGHTS_ANNOTATION, endpoints::Endpoint, notes::Notes};

/// The weights one Service gives its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Weights {
    by_address: BTreeMap<IpAddr, u16>,
    by_name: BTreeMap<String, u16>,
}

impl Weights {
    /// Parses the annotation's value; problems go to `problems`.
    pub(super) fn parse(value: &str, problems: &mut Notes) -> Self {
        let mut w = Self::default();
        for entry in value.split(|c: char| c == ',' || c.is_whitespace()).filter(|e| !e.is_empty()) {
            let Some((key, weight)) = entry.split_once('=') else {
                problems.push(format!("{WEIGHTS_ANNOTATION}: {entry:?} is not key=weight; ignored"));
                continue;
            };
            let Ok(weight) = weight.parse::<u16>() else {
                problems
                    .push(format!("{WEIGHTS_ANNOTATION}: {entry:?}: the weight is not an integer 0–65535; ignored"));
                continue;
            };
            let earlier = match key.parse::<IpAddr>() {
                Ok(a) => w.by_address.insert(a, weight),
                Err(_) if key.is_empty() => {
                    problems.push(format!("{WEIGHTS_ANNOTATION}: {entry:?} names no endpoint; ignored"));
                    continue;
                }
                Err(_) => w.by_name.insert(key.to_string(), weight),
            };
            if earlier.is_some() {
                problems.push(format!("{WEIGHTS_ANNOTATION}: {key} is given twice; the last ({weight}) counts"));
            }
        }
        w
    }

    /// The weight of `e`: by its address, else its pod name, else 1.
    pub(super) fn of(&self, e: &Endpoint) -> u16 {
        self.by_address
            .get(&e.address)
            .or_else(|| e.name.as_ref().and_then(|n| self.by_name.get(n)))
            .copied()
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(address: &str, name: Option<&str>) -> Endpoint {
        Endpoint {
            address: address.parse().unwrap(),
            port: 80,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            name: name.map(str::to_string),
            weight: 1,
            zone_hints: Vec::new(),
            node_hints: Vec::new(),
        }
    }

    #[test]
    fn names_addresses_and_defaults() {
        let mut p = Notes::default();
        let w = Weights::parse("web-0=3, web-1=0\n 10.0.0.9=7 fd00::5=2,,web-2=1", &mut p);
        assert!(p.0.is_empty(), "{p:?}");
        assert_eq!(w.of(&endpoint("10.0.0.1", Some("web-0"))), 3);
        assert_eq!(w.of(&endpoint("10.0.0.2", Some("web-1"))), 0);
        assert_eq!(w.of(&endpoint("10.0.0.9", Some("web-0"))), 7, "the address wins");
        assert_eq!(w.of(&endpoint("fd00::5", None)), 2);
        assert_eq!(w.of(&endpoint("10.0.0.3", Some("other"))), 1);
        assert_eq!(w.of(&endpoint("10.0.0.4", None)), 1);
    }

    #[test]
    fn bad_entries_are_reported_and_left_out() {
        let mut p = Notes::default();
        let w = Weights::parse("web-0=3 web-1 web-2=70000 web-3=-1 =4 web-4=x web-0=5", &mut p);
        let msgs: Vec<&str> = p.0.iter().map(|n| n.message.as_str()).collect();
        assert_eq!(msgs.len(), 6, "{msgs:#?}");
        assert!(msgs[0].contains("\"web-1\" is not key=weight"));
        assert!(msgs[1].contains("web-2=70000") && msgs[2].contains("web-3=-1"));
        assert!(msgs[3].contains("names no endpoint") && msgs[4].contains("web-4=x"));
        assert!(msgs[5].contains("given twice"));
        assert_eq!(w.of(&endpoint("10.0.0.1", Some("web-0"))), 5);
        assert_eq!(w.of(&endpoint("10.0.0.2", Some("web-2"))), 1);
    }
}
