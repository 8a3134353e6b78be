// SPDX-License-Identifier: MIT OR Apache-2.0
//! LoadBalancer fixtures shared by the bare-metal end-to-end tests
//! (`tests/e2e_lb.rs` from manifests, `tests/e2e_lb_api.rs` through the API
//! server): a pool on the underlay's own subnet, so the external client
//! has no route to its addresses but its on-link one, and a dual-stack
//! LoadBalancer Service over the `web` pods.

/// Addresses on the underlay: 192.168.60.100–110 and fd60::100–10f.
pub const UNDERLAY_POOL: &str = r#"
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: underlay}
spec:
  blocks: [{start: 192.168.60.100, stop: 192.168.60.110}, {start: "fd60::100", stop: "fd60::10f"}]
"#;

/// `demo/web`, dual-stack, port 80 → 9376; the oldest Service, so it gets
/// the pool's first addresses.
pub const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30080}]
"#;
