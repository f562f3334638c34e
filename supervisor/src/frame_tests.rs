use super::*;

fn encoded(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode(Bytes::copy_from_slice(payload), &mut buf).unwrap();
    buf
}

/// Decodes `reads` as `Framed` reads a socket: each read into the buffer's spare room,
/// `most` bytes at most at a time, room for one more byte made before each. Keeps the
/// frames if `keep` (a service holding them), else drops each at once; returns them and the
/// largest the buffer grew.
fn read_like_a_socket(
    codec: &mut FrameCodec,
    reads: &[Vec<u8>],
    most: usize,
    keep: bool,
) -> (Vec<Bytes>, usize) {
    let (mut buf, mut out, mut largest) = (BytesMut::new(), Vec::new(), 0);
    for read in reads {
        let mut at = 0;
        while at < read.len() {
            buf.reserve(1);
            largest = largest.max(buf.capacity());
            let n = most.min(buf.capacity() - buf.len()).min(read.len() - at);
            buf.put_slice(&read[at..at + n]);
            at += n;
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                largest = largest.max(buf.capacity());
                if keep {
                    out.push(frame);
                }
            }
        }
    }
    (out, largest)
}

fn large(fill: u8) -> Vec<u8> {
    vec![fill; 200 * 1024]
}

fn wire(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.iter().flat_map(|p| encoded(p).to_vec()).collect()
}

fn at(frame: &Bytes) -> usize {
    frame.as_ptr() as usize
}

#[test]
fn large_frames_share_one_arena_and_a_short_one_after_them_does_not() {
    let sent = [large(1), large(2), large(3), b"short".to_vec(), large(4)];
    // The short frame ends a read: nothing is known of what follows it.
    let reads = [wire(&sent[..4]), wire(&sent[4..])];
    let mut codec = FrameCodec::default();
    let (got, _) = read_like_a_socket(&mut codec, &reads, 64 * 1024, true);
    assert_eq!(got, sent.iter().map(|p| Bytes::copy_from_slice(p)).collect::<Vec<_>>());
    // Each large frame follows the one before in memory, behind its own length and version
    // bytes: read in place, none copied into a buffer of its own.
    for pair in got[..3].windows(2) {
        assert_eq!(at(&pair[1]), at(&pair[0]) + pair[0].len() + HEADER + 1);
    }
    let arena = at(&got[0])..at(&got[0]) + ARENA;
    assert!(!arena.contains(&at(&got[3])), "the short frame was left in the arena");
    assert!(!arena.contains(&at(&got[4])), "the arena was not left at the short frame");
    assert!(codec.arena.contains(&at(&got[4])), "the last one is in an arena of its own");
}

#[test]
fn a_short_frame_with_a_large_one_known_behind_it_keeps_the_arena() {
    let sent = [large(1), b"short".to_vec(), large(2)];
    let mut codec = FrameCodec::default();
    let (got, _) = read_like_a_socket(&mut codec, &[wire(&sent)], 1 << 20, true);
    assert_eq!(got.len(), 3);
    let arena = at(&got[0])..at(&got[0]) + ARENA;
    assert!(!arena.contains(&at(&got[1])), "the short frame was left in the arena");
    assert_eq!(at(&got[2]), at(&got[0]) + got[0].len() + 2 * (HEADER + 1) + got[1].len());
}

#[test]
fn a_connection_leaves_each_arena_before_it_fills_and_never_grows_one() {
    // 16 MiB of batches with a heartbeat now and then, each frame dropped once read, as a
    // service that copies what it receives does. A reader that kept its arena as its
    // buffer took it back whole once its frames were gone, and grew it to 16 MiB.
    let mut frames = Vec::new();
    for i in 0..80u8 {
        frames.push(large(i));
        if i % 7 == 6 {
            frames.push(b"beat".to_vec());
        }
    }
    let mut codec = FrameCodec::default();
    let (_, largest) = read_like_a_socket(&mut codec, &[wire(&frames)], 64 * 1024, false);
    assert!(largest <= ARENA, "the read buffer grew to {largest} bytes");
}

#[test]
fn short_frames_never_make_an_arena() {
    let sent: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 4000]).collect();
    let mut codec = FrameCodec::default();
    let (got, largest) = read_like_a_socket(&mut codec, &[wire(&sent)], 64 * 1024, true);
    assert_eq!(got.len(), sent.len());
    assert!(codec.arena.is_empty());
    assert!(largest < LARGE, "the read buffer grew to {largest} bytes");
}

#[test]
fn frames_round_trip_even_when_split_across_reads() {
    let wire = [encoded(b"hello"), encoded(b""), encoded(&[7; 1000])].concat();
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in wire.chunks(3) {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(out, vec![Bytes::from_static(b"hello"), Bytes::new(), Bytes::from(vec![7; 1000])]);
}

#[test]
fn a_connection_closed_inside_a_frame_says_so_and_one_closed_between_frames_ends() {
    let mut codec = FrameCodec::default();
    let whole = encoded(b"hello");
    let mut cut = BytesMut::from(&whole[..whole.len() - 2]);
    let said = codec.decode_eof(&mut cut).expect_err("a cut frame").to_string();
    assert!(said.contains("the peer closed the connection 8 bytes into a frame"), "{said}");
    let mut buf = whole.clone();
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(Bytes::from_static(b"hello")));
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
}

#[test]
fn an_oversized_length_is_refused_before_buffering() {
    let mut codec = FrameCodec::new(1024);
    let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(SupervisorError::FrameTooLarge { len: 0x7fff_ffff, max: 1024 })
    ));
    assert!(buf.capacity() < 1024, "nothing was reserved for the frame");
}

#[test]
fn messages_round_trip_and_a_short_or_unknown_one_is_refused() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let sent = [
        Wire::Request { id: 7, body: Bytes::from_static(b"ping") },
        Wire::Response { id: u64::MAX, body: Bytes::new() },
    ];
    for wire in sent.clone() {
        codec.encode(wire, &mut buf).unwrap();
    }
    let mut got = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).unwrap() {
        got.push(Wire::decode(frame).unwrap());
    }
    assert_eq!(got, sent);
    assert!(matches!(Wire::decode(Bytes::from_static(&[0; 8])), Err(SupervisorError::Codec(_))));
    assert!(matches!(Wire::decode(Bytes::from_static(&[2; 9])), Err(SupervisorError::Codec(_))));
}

#[test]
fn a_message_over_the_limit_is_not_written() {
    let mut codec = FrameCodec::new(64);
    let mut buf = BytesMut::new();
    let wire = Wire::Request { id: 1, body: Bytes::from(vec![0; 64]) };
    assert!(matches!(codec.encode(wire, &mut buf), Err(SupervisorError::FrameTooLarge { .. })));
    assert!(buf.is_empty());
}

#[test]
fn unknown_versions_and_empty_frames_are_refused() {
    let mut codec = FrameCodec::default();
    let newer = VERSION + 1;
    let mut buf = BytesMut::from(&[0, 0, 0, 2, newer, 0][..]);
    assert!(
        matches!(codec.decode(&mut buf), Err(SupervisorError::UnsupportedVersion(v)) if v == newer)
    );
    let older = MIN_VERSION - 1;
    let mut buf = BytesMut::from(&[0, 0, 0, 2, older, 0][..]);
    let refused = codec.decode(&mut buf);
    assert!(matches!(refused, Err(SupervisorError::UnsupportedVersion(v)) if v == older));
    // The acceptor of a node of another build reads no Hello: the frame says what to do.
    let said = refused.unwrap_err().to_string();
    assert!(said.contains("upgrade the older node"), "{said}");
    let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
    assert!(matches!(codec.decode(&mut buf), Err(SupervisorError::EmptyFrame)));
}
