//! Property tests of what `tendril` decodes from the network besides the frames (those
//! are in `protocol/tests/proptest_frames.rs`): a dispatch's deadline turned into a
//! monotonic one, Proxmox task ids (UPIDs), `net0` strings and TLS fingerprints from the
//! Proxmox API or its settings, and the UTF-8 decoding of streamed process output.
//! Nothing may panic; valid inputs round-trip.
//!
//! `PROPTEST_CASES` sets the case count (default 1024; `PROPTEST_CASES=1000000` for the
//! long run).

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config;
use tendril::exec::deadline::{Deadline, WallClock};
use tendril::proxmox::tls::parse_fingerprint;
use tendril::proxmox::types::Net0;
use tendril::proxmox::upid::Upid;
use tendril::terraform::logs::decode_utf8;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

struct FixedClock(i64);

impl WallClock for FixedClock {
    fn now_ms(&self) -> i64 {
        self.0
    }
}

const THIRTY_YEARS: Duration = Duration::from_secs(30 * 365 * 86_400);

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn any_deadline_from_the_server_becomes_a_bounded_monotonic_one(
        deadline_ms in prop_oneof![any::<i64>(), Just(i64::MAX), Just(i64::MIN), Just(0i64)],
        now_ms in prop_oneof![any::<i64>(), 0i64..4_000_000_000_000, Just(i64::MIN)],
    ) {
        let d = Deadline::from_server(deadline_ms, &FixedClock(now_ms));
        prop_assert!(d.remaining <= THIRTY_YEARS);
        let left = i128::from(deadline_ms) - i128::from(now_ms);
        if left <= 0 {
            prop_assert_eq!(d.remaining, Duration::ZERO);
        } else if left < i128::from(i64::MAX) && (left as u128) < THIRTY_YEARS.as_millis() {
            prop_assert_eq!(d.remaining, Duration::from_millis(left as u64));
        }
    }

    #[test]
    fn upids_never_panic_and_valid_ones_round_trip(
        s in any::<String>(),
        node in "[a-z][a-z0-9-]{0,15}",
        pid in any::<u32>(),
        pstart in 0u64..0xF_FFFF_FFFF,
        starttime in any::<u32>(),
        kind in "[a-z]{1,10}",
        id in "[0-9]{0,6}",
        user in "[a-z]{1,8}@(pam|pve)(![a-z]{1,8})?",
    ) {
        let _ = Upid::parse(&s);
        let _ = Upid::parse(&format!("UPID:{s}"));
        let _ = Upid::parse(&format!("UPID:{s}:"));
        let text = format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
        let u = Upid::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(u.as_str(), text.as_str());
        prop_assert_eq!(&u.node, &node);
        prop_assert_eq!(u.pid, pid);
        prop_assert_eq!(u.pstart, pstart);
        prop_assert_eq!(u.starttime, u64::from(starttime));
        prop_assert_eq!(&u.user, &user);
    }

    #[test]
    fn net0_and_fingerprints_never_panic(s in any::<String>(), bytes in proptest::array::uniform32(any::<u8>())) {
        let _ = Net0::parse(&s);
        let _ = parse_fingerprint(&s);
        let colons: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        prop_assert_eq!(parse_fingerprint(&colons.join(":")), Ok(bytes));
        prop_assert_eq!(parse_fingerprint(&format!("sha256:{}", colons.concat().to_lowercase())), Ok(bytes));
    }

    #[test]
    fn output_decoded_in_any_chunks_equals_decoding_it_whole(
        bytes in proptest::collection::vec(
            prop_oneof![any::<u8>(), Just(0xE2u8), Just(0x82u8), Just(0xACu8), Just(0xF0u8), Just(0x9Fu8)],
            0..256,
        ),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        let mut carry = Vec::new();
        let mut out = String::new();
        let mut from = 0;
        for &to in &at {
            decode_utf8(&mut carry, &bytes[from..to], &mut out, false);
            from = to;
        }
        decode_utf8(&mut carry, &bytes[from..], &mut out, true);
        prop_assert!(carry.is_empty());
        prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
    }
}
