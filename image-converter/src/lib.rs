//! The FaaSNet image converter as a library: registry client, OCI layout access, image
//! conversion into the FaaSNet block format, and TOC inspection / verification.
//!
//! The `image-converter` binary is a thin CLI over these modules. The [`registry`] module is
//! meant to be reused (e.g. by the snapshotter for range reads of converted blobs).

pub mod cache;
pub mod convert;
pub mod error;
pub mod inspect;
pub mod manifest;
pub mod oci_layout;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod start_profile;
pub mod store;
pub mod stream_io;

pub use convert::{convert_image, ConvertConfig, ConvertOutcome};
pub use error::{Error, Result};
pub use reference::{ImageLocation, Reference};
pub use registry::{ClientConfig, RegistryClient, RegistryError};
pub use start_profile::StartProfile;
pub use store::Store;

/// Parses a size such as `512KiB`, `1MiB`, `4M`, `65536` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512KiB, 1MiB, 65536)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("unknown size unit {unit:?} (use KiB or MiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(super::parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(super::parse_size("65536").unwrap(), 65536);
        assert!(super::parse_size("1GB").is_err());
    }
}
