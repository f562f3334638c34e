use super::*;
use crate::run::Packed;

#[test]
fn a_batch_reads_back_with_its_entries_a_slice_of_the_body() {
    let mut packed = Packed::with_capacity(0);
    packed.push_encoded(Key(4), &"four".to_string()).unwrap();
    let entries = packed.into_run();
    let answered = vec![Answered {
        key: Key(4),
        id: RequestId { origin: NodeId(1), seq: 9 },
        response: vec![1].into(),
    }];
    let settled = vec![(NodeId(1), Settlement { since: 5, below: 9 })];
    let batch = Message::Batch { epoch: 3, service: ServiceId(2), answered, settled, entries };
    let body = Bytes::from(batch.encode().unwrap());
    let Message::Batch { epoch, service, answered, settled, entries } =
        Message::decode(body.clone()).unwrap()
    else {
        panic!("not a batch")
    };
    assert_eq!((epoch, service, answered.len()), (3, ServiceId(2), 1));
    assert_eq!(settled, vec![(NodeId(1), Settlement { since: 5, below: 9 })]);
    assert_eq!(entries.decode::<String>().unwrap(), vec![(Key(4), "four".to_string())]);
    let at = entries.bytes().as_ptr() as usize - body.as_ptr() as usize;
    assert_eq!(at + entries.size(), body.len(), "the entries are the body's tail, not a copy");
}

/// `back` read back what `sent` says, but for the body.
fn assert_same_header(back: &Routed, sent: &Routed) {
    assert_eq!(
        (back.id, back.service, back.key, back.epoch),
        (sent.id, sent.service, sent.key, sent.epoch)
    );
    assert_eq!(
        (back.wait_ms, back.settled, back.repeatable),
        (sent.wait_ms, sent.settled, sent.repeatable)
    );
}

fn routed() -> Routed {
    Routed {
        id: RequestId { origin: NodeId(3), seq: u64::MAX - 7 },
        service: ServiceId(2),
        key: Key(1 << 63 | 12345),
        epoch: 41,
        body: Bytes::new(),
        wait_ms: 2000,
        settled: Settlement { since: 1 << 40, below: (1 << 40) + 9 },
        repeatable: true,
    }
}

#[test]
fn a_request_reads_back_field_for_field_and_is_encoded_alike_from_a_borrowed_body() {
    let body = vec![7u8; 300];
    let borrowed = routed().encode_request(&body);
    let owned =
        Message::Request(Routed { body: body.clone().into(), ..routed() }).encode().unwrap();
    assert_eq!(borrowed, owned);
    let frame = Bytes::from(borrowed);
    let Message::Request(back) = Message::decode(frame.clone()).unwrap() else {
        panic!("not a request")
    };
    let at = back.body.as_ptr() as usize - frame.as_ptr() as usize;
    assert_eq!(at, ROUTED_HEADER, "the body is the frame's tail, not a copy");
    assert_same_header(&back, &routed());
    assert_eq!(back.body, body);
    let not = Routed { repeatable: false, ..routed() };
    let Message::Request(back) = Message::decode(Bytes::from(not.encode_request(&[]))).unwrap()
    else {
        panic!("not a request")
    };
    assert!(!back.repeatable && back.body.is_empty());
}

#[test]
fn a_typed_request_encoded_in_one_piece_is_the_same_message_as_its_body_encoded_apart() {
    let request = (7u64, String::from("a read fault"), vec![1u8; 40]);
    let whole = routed().encode_typed(&request).unwrap();
    assert_eq!(whole, routed().encode_request(&codec::encode(&request).unwrap()));
    let Message::Request(back) = Message::decode(Bytes::from(whole)).unwrap() else {
        panic!("not a request")
    };
    assert_same_header(&back, &routed());
    assert_eq!(codec::decode::<(u64, String, Vec<u8>)>(&back.body).unwrap(), request);
}

#[test]
fn a_request_cut_short_or_with_a_bad_flag_is_refused() {
    let whole = routed().encode_request(b"body");
    let short = Bytes::copy_from_slice(&whole[..ROUTED_HEADER - 1]);
    assert!(matches!(Message::decode(short), Err(AdaptationError::Codec(_))));
    let mut flag = whole.clone();
    flag[ROUTED_HEADER - 1] = 2;
    assert!(matches!(Message::decode(Bytes::from(flag)), Err(AdaptationError::Codec(_))));
}

#[test]
fn a_told_message_reads_back_with_its_body_a_slice_and_is_encoded_alike_either_way() {
    let (service, key) = (ServiceId(3), Key(u64::MAX - 5));
    let request = (7u64, String::from("a replica"));
    let encoded = Message::encode_local(service, key, &request).unwrap();
    let body = codec::encode(&request).unwrap();
    assert_eq!(Message::local_body(&encoded), &body[..]);
    let built = Message::Local { service, key, body: Bytes::from(body.clone()) };
    assert_eq!(built.encode().unwrap(), encoded);
    let bytes = Bytes::from(encoded);
    let Message::Local { service: s, key: k, body: b } = Message::decode(bytes.clone()).unwrap()
    else {
        panic!("not a told message")
    };
    assert_eq!((s, k, &b[..]), (service, key, &body[..]));
    assert_eq!(b.as_ptr(), bytes[LOCAL_HEADER..].as_ptr(), "the body is not copied");
    let short = bytes.slice(..LOCAL_HEADER - 1);
    assert!(matches!(Message::decode(short), Err(AdaptationError::Codec(_))));
    let empty = Message::decode(bytes.slice(..LOCAL_HEADER)).unwrap();
    assert!(matches!(empty, Message::Local { body, .. } if body.is_empty()));
}

proptest::proptest! {
    // Seeded, as every test here: the same cases in every run.
    #![proptest_config(proptest::test_runner::Config {
        cases: 512,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x7769_7265),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]

    /// Whatever a peer sends, decoding gives a message or an error, and a request written
    /// from any header reads back as it was written.
    #[test]
    fn any_bytes_decode_without_panicking_and_any_request_round_trips(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        fields in proptest::prelude::any::<(u64, u64, u16, u64, u64, u64, u64, u64, bool)>(),
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
    ) {
        let _ = Message::decode(Bytes::from(bytes.clone()));
        let mut tagged = bytes.clone();
        tagged.insert(0, FIXED);
        let _ = Message::decode(Bytes::from(tagged.clone()));
        tagged[0] = LOCAL;
        let _ = Message::decode(Bytes::from(tagged.clone()));
        let _ = Reply::decode(&Bytes::from(bytes.clone()));
        let mut ended = bytes.clone();
        ended.push(FIXED);
        let _ = Reply::decode(&Bytes::from(ended.clone()));
        ended.pop();
        ended.push(CODED);
        let _ = Reply::decode(&Bytes::from(ended));
        let (origin, seq, service, key, epoch, wait_ms, since, below, repeatable) = fields;
        let sent = Routed {
            id: RequestId { origin: NodeId(origin), seq },
            service: ServiceId(service),
            key: Key(key),
            epoch,
            body: Bytes::new(),
            wait_ms,
            settled: Settlement { since, below },
            repeatable,
        };
        let Ok(Message::Request(back)) = Message::decode(Bytes::from(sent.encode_request(&body)))
        else {
            panic!("a request did not read back")
        };
        proptest::prop_assert_eq!((back.id, back.service, back.key, back.epoch), (sent.id, sent.service, sent.key, sent.epoch));
        proptest::prop_assert_eq!((back.wait_ms, back.settled, back.repeatable), (sent.wait_ms, sent.settled, sent.repeatable));
        proptest::prop_assert_eq!(back.body, body);
    }
}

fn round_trip(reply: Reply) -> Reply {
    Reply::decode(&Bytes::from(reply.encode().unwrap())).unwrap()
}

#[test]
fn a_reply_reads_back_done_and_every_other_kind() {
    let done = Reply::Done(Bytes::from_static(&[1, 2, 3])).encode().unwrap();
    assert_eq!(done, [1, 2, 3, FIXED]);
    assert!(
        matches!(round_trip(Reply::Done(vec![1, 2, 3].into())), Reply::Done(r) if r == [1, 2, 3][..])
    );
    assert!(matches!(round_trip(Reply::Done(Bytes::new())), Reply::Done(r) if r.is_empty()));
    // A response that ends in the other tag is still a response.
    assert!(
        matches!(round_trip(Reply::Done(vec![CODED].into())), Reply::Done(r) if r == [CODED][..])
    );
    assert!(matches!(round_trip(Reply::Moved { epoch: 9 }), Reply::Moved { epoch: 9 }));
    assert!(matches!(round_trip(Reply::Refused("why".into())), Reply::Refused(w) if w == "why"));
    let frame = Bytes::from(Reply::Done(vec![5u8; 64].into()).encode().unwrap());
    let Reply::Done(response) = Reply::decode(&frame).unwrap() else { panic!("not done") };
    assert_eq!(response.as_ptr(), frame.as_ptr(), "the response is the frame's head, not a copy");
    // Nothing, or an unknown tag, is refused.
    assert!(matches!(Reply::decode(&Bytes::new()), Err(AdaptationError::Codec(_))));
    assert!(matches!(Reply::decode(&Bytes::from_static(&[7])), Err(AdaptationError::Codec(_))));
    // Every other message still starts with its bincode variant index, below the tag.
    let others = [
        Message::Ack { epoch: 1 },
        Message::Batch {
            epoch: 1,
            service: ServiceId(1),
            entries: Run::default(),
            answered: Vec::new(),
            settled: Vec::new(),
        },
    ];
    for message in others {
        assert!(message.encode().unwrap()[0] < FIXED, "{message:?}");
    }
    const { assert!(FIXED < LOCAL && LOCAL < FORWARD) };
    // A request passed on reads back as one, body and all.
    let with_body = || Routed { body: Bytes::from_static(b"body"), ..routed() };
    let forward = Bytes::from(Message::Forward(with_body()).encode().unwrap());
    assert_eq!(forward[0], FORWARD);
    let Message::Forward(back) = Message::decode(forward).unwrap() else { panic!("not a forward") };
    assert_same_header(&back, &with_body());
    assert_eq!(back.body, with_body().body);
    // Those laid out by hand are refused in bincode's layout.
    for message in [Message::Request(routed()), Message::Forward(routed())] {
        let bincode = codec::encode(&message).unwrap();
        assert!(matches!(Message::decode(Bytes::from(bincode)), Err(AdaptationError::Codec(_))));
    }
    let told = Message::Local { service: ServiceId(1), key: Key(2), body: Bytes::new() };
    let bincode = codec::encode(&told).unwrap();
    assert!(matches!(Message::decode(Bytes::from(bincode)), Err(AdaptationError::Codec(_))));
}

#[test]
fn bytes_after_a_message_that_is_not_a_batch_are_refused() {
    let mut body = Message::Ack { epoch: 1 }.encode().unwrap();
    assert!(Message::decode(Bytes::from(body.clone())).is_ok());
    body.push(0);
    assert!(matches!(Message::decode(Bytes::from(body)), Err(AdaptationError::Codec(_))));
}
