//! `appliance release-holder`: gives the unused numbers of an appliance that is gone for
//! good (its data dir lost with a disk) back to the tax authority.
//!
//! The tax server grants segments to a holder (appliance id, shard). A new data dir is a
//! new appliance id, so nothing of the lost appliance's segments is ever adopted again:
//! safe, but those numbers would stay reserved forever. This command, run explicitly by an
//! operator who knows the old appliance will never come back, asks the tax server for
//! every segment of that appliance id and returns, from each, the numbers at and above
//! its coded mark: numbers below the mark may have been coded (issued by the lost
//! appliance, or lost with its last tick) and stay accounted as used. Without
//! `--execute` it only shows what it would return.
//!
//! Should the old appliance come back after all, nothing is issued twice: the returned
//! numbers are refused by the tax server (`NumberNotGranted`) and spoiled by the shard.

use std::fmt::Write as _;
use std::time::Duration;

use hsm_driver::proto::{Holder, InventoryScope, Request, Response, Segment, TaxpayerInventory};
use hsm_driver::route::Route;
use hsm_driver::tcp::blocking::Client;
use hsm_driver::tcp::TcpClientConfig;

/// Why the release did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The appliance id is not 32 hex digits.
    #[error(
        "appliance id {0:?} is not 32 hex digits (see identity.toml or the control port's /status)"
    )]
    BadId(String),
    /// Only TCP routes are served by this command.
    #[error("route {0}: release-holder talks to the tax server over tcp:// only")]
    NotTcp(String),
    /// The route does not parse.
    #[error("route: {0}")]
    Route(#[from] hsm_driver::route::RouteError),
    /// The tax server refused or could not be reached.
    #[error("tax server: {0}")]
    TaxServer(String),
}

/// One held piece of the lost appliance and what releasing it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Taxpayer (18 ASCII).
    pub taxpayer: String,
    /// The holder (its shard).
    pub holder: Holder,
    /// The held piece.
    pub segment: Segment,
    /// The device's coded mark of the segment.
    pub coded_end: u32,
    /// The unused range returned (or to return); `None` when every number may be used.
    pub returned: Option<Segment>,
}

/// Parses a 32-hex-digit appliance id.
pub fn parse_id(text: &str) -> Result<u128, ReleaseError> {
    let t = text.trim();
    if t.len() != 32 {
        return Err(ReleaseError::BadId(text.to_owned()));
    }
    u128::from_str_radix(t, 16).map_err(|_| ReleaseError::BadId(text.to_owned()))
}

/// The unused rest of a held piece: the numbers at and above the coded mark.
pub fn unused_rest(segment: &Segment, coded_end: u32) -> Option<Segment> {
    let end = u64::from(segment.first) + u64::from(segment.count);
    let from = u64::from(segment.first).max(u64::from(coded_end));
    (from < end).then(|| Segment {
        code: segment.code,
        first: from as u32,
        count: (end - from) as u32,
    })
}

/// Lists (and with `execute`, returns) the unused numbers of every segment held by
/// appliance `appliance` on the tax server at `route`.
pub fn release(route: &str, appliance: u128, execute: bool) -> Result<Vec<Released>, ReleaseError> {
    let parsed: Route = route.parse()?;
    let Route::Tcp { host, port } = parsed else {
        return Err(ReleaseError::NotTcp(route.to_owned()));
    };
    let config = TcpClientConfig {
        connect_timeout: Duration::from_secs(5),
        call_timeout: Duration::from_secs(30),
        ..TcpClientConfig::default()
    };
    let mut client = Client::connect((host.as_str(), port), config)
        .map_err(|e| ReleaseError::TaxServer(e.to_string()))?;
    let inventory: Vec<TaxpayerInventory> =
        match client.call(&Request::Inventory(InventoryScope::All)) {
            Ok(Response::Inventory(list)) => list,
            Ok(_) => {
                return Err(ReleaseError::TaxServer(
                    "unexpected answer to Inventory".into(),
                ))
            }
            Err(e) => return Err(ReleaseError::TaxServer(e.to_string())),
        };
    let mut out = Vec::new();
    for entry in &inventory {
        let taxpayer = String::from_utf8_lossy(&entry.taxpayer).into_owned();
        for held in entry
            .segments
            .iter()
            .filter(|h| h.holder.appliance == appliance)
        {
            let returned = unused_rest(&held.segment, held.coded_end);
            if let (true, Some(rest)) = (execute, returned) {
                let request = Request::ReturnSegment {
                    taxpayer: entry.taxpayer,
                    segment: rest,
                    holder: held.holder,
                };
                match client.call(&request) {
                    Ok(Response::ReturnSegment) => {}
                    Ok(_) => {
                        return Err(ReleaseError::TaxServer(
                            "unexpected answer to ReturnSegment".into(),
                        ))
                    }
                    Err(e) => {
                        return Err(ReleaseError::TaxServer(format!(
                            "returning {rest:?} of {taxpayer}: {e}"
                        )))
                    }
                }
            }
            out.push(Released {
                taxpayer: taxpayer.clone(),
                holder: held.holder,
                segment: held.segment,
                coded_end: held.coded_end,
                returned,
            });
        }
    }
    Ok(out)
}

/// The table the CLI prints.
pub fn table(rows: &[Released], executed: bool) -> String {
    let mut s = String::new();
    let verb = if executed { "returned" } else { "to return" };
    let _ = writeln!(
        s,
        "{:<18}  {:>5}  {:>12}  {:>9}  {:>9}  {:>9}  {:>9}",
        "taxpayer", "shard", "code", "first", "count", "coded to", verb
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<18}  {:>5}  {:>12}  {:>9}  {:>9}  {:>9}  {:>9}",
            r.taxpayer,
            r.holder.shard,
            r.segment.code,
            r.segment.first,
            r.segment.count,
            r.coded_end,
            r.returned.map_or(0, |s| s.count)
        );
    }
    let total: u64 = rows
        .iter()
        .map(|r| u64::from(r.returned.map_or(0, |s| s.count)))
        .sum();
    let _ = writeln!(s, "{} segments, {total} numbers {verb}", rows.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unused_rest_starts_at_the_coded_mark() {
        let seg = Segment {
            code: 7,
            first: 100,
            count: 50,
        };
        assert_eq!(unused_rest(&seg, 0), Some(seg));
        assert_eq!(
            unused_rest(&seg, 120),
            Some(Segment {
                code: 7,
                first: 120,
                count: 30
            })
        );
        assert_eq!(unused_rest(&seg, 150), None);
        assert_eq!(unused_rest(&seg, 4_000), None);
    }

    #[test]
    fn ids_are_32_hex_digits() {
        assert_eq!(parse_id(&format!("{:032x}", 0xabcu128)).unwrap(), 0xabc);
        assert!(parse_id("abc").is_err());
        assert!(parse_id(&"g".repeat(32)).is_err());
    }
}
