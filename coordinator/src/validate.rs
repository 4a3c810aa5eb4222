//! Checks on names and addresses coming from the network, each with a message that says
//! what was expected.

use std::net::SocketAddr;

/// Longest tenant name, node id or function digest accepted.
const MAX_LEN: usize = 256;

fn plain_text(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > MAX_LEN {
        return Err(format!("{what} is longer than {MAX_LEN} bytes"));
    }
    // NUL separates key parts in the store; control characters have no business here.
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("{what} {value:?} contains control characters"));
    }
    Ok(())
}

/// A tenant name: non-empty printable text.
pub fn tenant(value: &str) -> Result<(), String> {
    plain_text("tenant", value)
}

/// A node id: non-empty printable text.
pub fn node_id(value: &str) -> Result<(), String> {
    plain_text("node_id", value)
}

/// A function id: the converted image's manifest digest, `algorithm:encoded` as in the OCI
/// image spec; for sha256 the encoded part must be 64 lowercase hex digits.
pub fn function(value: &str) -> Result<(), String> {
    plain_text("function", value)?;
    let bad = || {
        format!(
            "function {value:?} is not a manifest digest: expected algorithm:hex, e.g. sha256:<64 hex digits>"
        )
    };
    let (alg, enc) = value.split_once(':').ok_or_else(bad)?;
    let alg_ok = !alg.is_empty()
        && alg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
    let enc_ok = !enc.is_empty()
        && enc
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=_-".contains(c));
    if !alg_ok || !enc_ok {
        return Err(bad());
    }
    if alg == "sha256"
        && !(enc.len() == 64
            && enc
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)))
    {
        return Err(bad());
    }
    Ok(())
}

fn host_ok(host: &str) -> bool {
    if host.starts_with('[') && host.ends_with(']') {
        return host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn host_port_ok(hp: &str, port_required: bool) -> bool {
    if let Ok(sa) = hp.parse::<SocketAddr>() {
        return sa.port() != 0;
    }
    match hp.rsplit_once(':') {
        // A bare IPv6 address without brackets has several colons; refuse it.
        Some((host, port)) if !host.contains(':') || host.starts_with('[') => {
            host_ok(host) && matches!(port.parse::<u16>(), Ok(p) if p != 0)
        }
        Some(_) => false,
        None => !port_required && host_ok(hp),
    }
}

/// A peer address where a VM serves blocks: `host:port` (an IP socket address or a DNS
/// name with a port) or an `http://` / `https://` URL with a host.
pub fn peer_addr(value: &str) -> Result<(), String> {
    let expected = "expected host:port (e.g. 10.0.0.5:7800 or vm-17.local:7800) or an http(s)://host[:port] URL";
    if value.is_empty() {
        return Err(format!("peer_addr is empty: {expected}"));
    }
    if value.len() > MAX_LEN || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("peer_addr {value:?} is malformed: {expected}"));
    }
    let ok = if let Some(rest) = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
    {
        let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
        !authority.contains('@') && host_port_ok(authority, false)
    } else if value.contains("://") {
        return Err(format!(
            "peer_addr {value:?} uses an unsupported scheme: {expected}"
        ));
    } else {
        host_port_ok(value, true)
    };
    if ok {
        Ok(())
    } else {
        Err(format!("peer_addr {value:?} is malformed: {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(function(&good).is_ok());
        assert!(function("sha512:abc").is_ok());
        assert!(function("sha256:abc").is_err());
        assert!(function("nodigest").is_err());
        assert!(function(&format!("SHA256:{}", "a".repeat(64))).is_err());
    }

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.5:7800",
            "[::1]:80",
            "vm-17.local:7800",
            "localhost:1",
            "http://10.0.0.5:7800",
            "https://vm.example/blocks",
            "http://[::1]:9",
        ] {
            assert!(peer_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:99999",
            "host:port",
            "::1:80",
            "ftp://x:1",
            "http://",
            "bad host:1",
            "-x:1",
        ] {
            assert!(peer_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(tenant("acme").is_ok());
        assert!(tenant("").is_err());
        assert!(node_id("a\0b").is_err());
    }
}
