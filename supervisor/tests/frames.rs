//! The frame decoder and the codec on random, truncated and hostile bytes: never a panic,
//! always a typed error or a frame.

use bytes::{Bytes, BytesMut};
use gobelins_adaptation::wire::Message;
use gobelins_adaptation::{AdaptationError, Packed, Run};
use gobelins_locator::{Key, ServiceId};
use gobelins_supervisor::frame::FrameCodec;
use gobelins_supervisor::handshake::HandshakeMessage;
use gobelins_supervisor::{codec, SupervisorError};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tokio_util::codec::{Decoder, Encoder};

fn config() -> Config {
    Config {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x6672_616d),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// A batch cut anywhere reads whole up to an entry boundary and is refused anywhere else;
    /// what reads back is exactly what was packed.
    #[test]
    fn a_batch_cut_anywhere_reads_back_whole_entries_or_is_refused(
        entries in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..48)), 0..12),
        cut in any::<proptest::sample::Index>(),
    ) {
        let mut packed = Packed::with_capacity(0);
        let mut boundaries = vec![0];
        for (key, bytes) in &entries {
            packed.push(Key(*key), bytes).expect("pushed");
            boundaries.push(boundaries.last().expect("one") + 12 + bytes.len());
        }
        let run = packed.into_run();
        let batch = Message::Batch { epoch: 3, service: ServiceId(2), answered: Vec::new(), settled: Vec::new(), entries: run };
        let body = batch.encode().expect("encodes");
        let head = body.len() - boundaries.last().expect("one");
        let at = head + cut.index(boundaries.last().expect("one") + 1);
        match Message::decode(Bytes::copy_from_slice(&body[..at])) {
            Ok(Message::Batch { entries: read, .. }) => {
                let whole = boundaries.iter().position(|&b| b == at - head);
                prop_assert!(whole.is_some(), "a cut inside an entry was read: {} of {:?}", at - head, boundaries);
                let back: Vec<(u64, Vec<u8>)> = read.entries().map(|(k, e)| (k.0, e.to_vec())).collect();
                prop_assert_eq!(&back[..], &entries[..whole.expect("checked")]);
            }
            Ok(other) => prop_assert!(false, "not a batch: {:?}", other),
            Err(AdaptationError::Codec(_)) => prop_assert!(!boundaries.contains(&(at - head)), "a whole prefix was refused"),
            Err(other) => prop_assert!(false, "untyped: {}", other),
        }
    }

    /// Whatever a peer's adaptation layer sends, reading it gives a message or a typed error,
    /// and a batch's entries are exactly the bytes after its head.
    #[test]
    fn random_adaptation_bodies_give_messages_or_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512), headed in any::<bool>()) {
        let mut body = Vec::new();
        if headed {
            let batch = Message::Batch { epoch: 1, service: ServiceId(1), answered: Vec::new(), settled: Vec::new(), entries: Run::default() };
            body = batch.encode().expect("a head encodes");
        }
        let head = body.len();
        body.extend_from_slice(&bytes);
        match Message::decode(Bytes::from(body)) {
            Ok(Message::Batch { entries, .. }) => {
                let walked: usize = entries.entries().map(|(_, e)| 12 + e.len()).sum();
                prop_assert_eq!(walked, entries.size());
                prop_assert_eq!(entries.entries().count(), entries.len());
                if headed {
                    prop_assert_eq!(entries.size(), bytes.len());
                }
            }
            Ok(other) => prop_assert!(!headed, "a batch head read as {:?}", other),
            Err(AdaptationError::Codec(_)) => prop_assert!(head == 0 || !bytes.is_empty()),
            Err(other) => prop_assert!(false, "untyped: {}", other),
        }
    }

    /// Frames whose lengths are plausible, their versions known or not and their bodies random:
    /// each known one reads back as its body, and the first other one gives a typed error.
    /// (Random bytes alone, below, almost never make a length under the limit.)
    #[test]
    fn framed_random_bodies_read_back_or_give_typed_errors(frames in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..1100), prop_oneof![3 => Just(gobelins_supervisor::frame::VERSION), 1 => any::<u8>()]), 1..6)) {
        let mut wire = Vec::new();
        for (body, version) in &frames {
            wire.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
            wire.push(*version);
            wire.extend_from_slice(body);
        }
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&wire[..]);
        for (body, version) in &frames {
            use gobelins_supervisor::frame::{MIN_VERSION, VERSION};
            let readable = (MIN_VERSION..=VERSION).contains(version) && body.len() < 1024;
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    prop_assert!(readable, "a frame of version {version}, {} bytes, read", body.len());
                    prop_assert_eq!(&frame[..], &body[..]);
                    let _ = codec::decode::<HandshakeMessage>(&frame);
                }
                Err(SupervisorError::FrameTooLarge { .. }) => {
                    prop_assert!(body.len() + 1 > 1024);
                    break;
                }
                Err(SupervisorError::UnsupportedVersion(v)) => {
                    prop_assert_eq!(v, *version);
                    prop_assert!(!(MIN_VERSION..=VERSION).contains(&v));
                    break;
                }
                other => prop_assert!(false, "unexpected {:?}", other.map(|f| f.map(|f| f.len()))),
            }
        }
    }

    #[test]
    fn random_bytes_give_frames_or_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    prop_assert!(frame.len() < 1024);
                    // Whatever the frame holds, decoding it as a message must not panic.
                    let _ = codec::decode::<HandshakeMessage>(&frame);
                }
                Ok(None) => break,
                Err(SupervisorError::FrameTooLarge { .. })
                | Err(SupervisorError::UnsupportedVersion(_))
                | Err(SupervisorError::EmptyFrame) => break,
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }
    }

    #[test]
    fn truncated_frames_wait_for_more_and_never_yield_garbage(
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        cut in 0usize..600,
    ) {
        let mut wire = BytesMut::new();
        FrameCodec::default().encode(Bytes::from(payload.clone()), &mut wire).unwrap();
        let cut = cut.min(wire.len());
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&wire[..cut]);
        let got = codec.decode(&mut buf).unwrap();
        if cut == wire.len() {
            prop_assert_eq!(got, Some(Bytes::from(payload)));
        } else {
            prop_assert_eq!(got, None);
        }
    }

    #[test]
    fn random_payloads_never_panic_the_message_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        match codec::decode::<HandshakeMessage>(&bytes) {
            Ok(_) | Err(AdaptationError::Codec(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}
