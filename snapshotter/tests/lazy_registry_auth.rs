//! The registry client's Bearer token flow against a minimal HTTP server that behaves like
//! a token-protected registry (401 + `WWW-Authenticate: Bearer ...`, token endpoint).

use std::sync::{Arc, Mutex};

use faasnet_snapshotter::lazy::{
    registry_source::{RegistryOptions, RegistrySource},
    LayerRef,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(listener: tokio::net::TcpListener, blob: Vec<u8>, log: Arc<Mutex<Vec<String>>>) {
    let addr = listener.local_addr().unwrap();
    loop {
        let (mut c, _) = listener.accept().await.unwrap();
        let (blob, log) = (blob.clone(), log.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                let n = c.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let req = String::from_utf8_lossy(&buf).to_string();
            let line = req.lines().next().unwrap().to_string();
            let header = |name: &str| {
                req.lines()
                    .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                    .map(|l| l.split_once(':').unwrap().1.trim().to_string())
            };
            log.lock().unwrap().push(line.clone());
            let (status, extra, body): (&str, String, Vec<u8>) = if line.starts_with("GET /token?")
            {
                assert!(line.contains("service=fake"), "{line}");
                assert!(
                    line.contains("scope=repository%3Ateam%2Fapp%3Apull"),
                    "{line}"
                );
                (
                    "200 OK",
                    "Content-Type: application/json\r\n".into(),
                    br#"{"token":"T0K"}"#.to_vec(),
                )
            } else if header("authorization").as_deref() != Some("Bearer T0K") {
                (
                    "401 Unauthorized",
                    format!(
                        "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"fake\",scope=\"repository:team/app:pull\"\r\n"
                    ),
                    Vec::new(),
                )
            } else {
                let range = header("range").unwrap();
                let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap();
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                (
                    "206 Partial Content",
                    format!("Content-Range: bytes {a}-{b}/{}\r\n", blob.len()),
                    blob[a..=b].to_vec(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            c.write_all(head.as_bytes()).await.unwrap();
            c.write_all(&body).await.unwrap();
        });
    }
}

#[tokio::test]
async fn bearer_token_flow_then_cached_token() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let blob: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let log = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(serve(listener, blob.clone(), log.clone()));

    let registry = RegistrySource::new(RegistryOptions::default()).unwrap();
    let layer = LayerRef::new(
        addr.to_string(),
        "team/app",
        format!("sha256:{}", "c".repeat(64)),
    )
    .unwrap();
    let got = registry.fetch_range(&layer, 100, 50).await.unwrap();
    assert_eq!(&got[..], &blob[100..150]);
    let got = registry.fetch_range(&layer, 0, 10).await.unwrap();
    assert_eq!(&got[..], &blob[..10]);
    let log = log.lock().unwrap().clone();
    // 401, token, retry with the token, then the token is reused: 4 requests.
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log[1].starts_with("GET /token?"), "{log:?}");
}
