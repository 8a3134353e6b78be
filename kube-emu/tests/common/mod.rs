// SPDX-License-Identifier: MIT OR Apache-2.0
//! Helpers of the emulator's tests: a kube-rs client, hand-written HTTP
//! (from a chosen source address), the `Status` of a failed kube-rs call.

#![allow(dead_code)]

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use kube_emu::ApiServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A kube-rs client of the emulator (from 127.0.0.1). Without kube-rs 5's
/// default retries (429, 503, 504 up to 15 times, backing off), so a 503
/// is seen at once.
pub fn client(api: &ApiServer) -> kube::Client {
    let mut config = kube::Config::new(format!("http://{}", api.addr).parse().unwrap());
    config.default_retry = false;
    kube::Client::try_from(config).expect("a client")
}

/// `(code, reason, message)` of a call that must fail with an API error.
pub fn api_error<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// One HTTP/1.1 request from the source address `from` (any when `None`):
/// `(status code, body)`.
pub async fn http(
    from: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(request(addr, method, path, content_type, body).as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.expect("an answer").unwrap();
    response(&raw)
}

/// A blocking `GET` (for threads without a runtime).
pub fn get_blocking(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request(addr, "GET", path, "application/json", "").as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    response(&raw)
}
