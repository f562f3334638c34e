//! Which layer a message between agents is for, told by its last byte.
//!
//! The supervisor's own requests and answers are encoded [`Request`]s and [`Response`]s. The
//! adaptation layer's messages travel as that layer encoded them: wrapped in an enum variant they
//! were copied into the envelope on the way out and out of it on the way in, twice per
//! migration batch. A trailing byte costs nothing, because the layer's encoder leaves room for
//! it ([`gobelins_adaptation::codec::encode`]).

use crate::error::{Result, SupervisorError};
use crate::rpc::{Request, Response};
use bytes::Bytes;
use gobelins_adaptation::codec;

/// The layer a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// An encoded [`Request`] or [`Response`].
    Supervisor,
    /// A message of the adaptation layer, or its answer.
    Adaptation,
}

impl Lane {
    /// The mark behind a message for this lane.
    pub fn trailer(self) -> &'static [u8] {
        match self {
            Lane::Supervisor => &[0],
            Lane::Adaptation => &[1],
        }
    }

    /// Marks `body` as for this lane.
    pub fn seal(self, mut body: Vec<u8>) -> Bytes {
        body.extend_from_slice(self.trailer());
        Bytes::from(body)
    }

    /// The lane `message` is for, and its body, without copying it.
    pub fn open(mut message: Bytes) -> Result<(Lane, Bytes)> {
        let lane = match message.last() {
            Some(0) => Lane::Supervisor,
            Some(1) => Lane::Adaptation,
            Some(other) => {
                return Err(SupervisorError::Codec(format!("a message for unknown lane {other}")))
            }
            None => return Err(SupervisorError::Codec("an empty message".into())),
        };
        message.truncate(message.len() - 1);
        Ok((lane, message))
    }
}

/// Encodes a request of the supervisor.
pub fn request(request: &Request) -> Result<Bytes> {
    Ok(Lane::Supervisor.seal(codec::encode(request)?))
}

/// Encodes an answer of the supervisor.
pub fn response(response: &Response) -> Result<Bytes> {
    Ok(Lane::Supervisor.seal(codec::encode(response)?))
}

/// Decodes an answer of the supervisor; one for the other lane is an error, and so is
/// `Stopped` ([`SupervisorError::PeerStopped`]).
pub fn decode_response(message: Bytes) -> Result<Response> {
    match Lane::open(message)? {
        // Taken for an error here, once for every caller: each once reported it as "the wrong
        // answer", which sent the operator looking for a bug rather than at the stopped node.
        (Lane::Supervisor, body) => match codec::decode(&body)? {
            Response::Stopped(why) => Err(SupervisorError::PeerStopped(why)),
            response => Ok(response),
        },
        (Lane::Adaptation, _) => {
            Err(SupervisorError::Codec("an adaptation answer to a supervisor request".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_comes_out_of_its_lane_as_it_went_in() {
        for lane in [Lane::Supervisor, Lane::Adaptation] {
            let (back, body) = Lane::open(lane.seal(b"batch".to_vec())).unwrap();
            assert_eq!((back, &body[..]), (lane, &b"batch"[..]));
        }
        let (lane, body) = Lane::open(request(&Request::Ping).unwrap()).unwrap();
        assert_eq!(lane, Lane::Supervisor);
        assert!(matches!(codec::decode::<Request>(&body).unwrap(), Request::Ping));
    }

    #[test]
    fn an_empty_message_or_an_unknown_lane_is_an_error() {
        assert!(Lane::open(Bytes::new()).is_err());
        assert!(Lane::open(Bytes::from_static(&[7, 2])).is_err());
        assert!(decode_response(Lane::Adaptation.seal(vec![1])).is_err());
    }

    #[test]
    fn sealing_an_encoded_message_does_not_copy_it() {
        let body = codec::encode(&vec![7u8; 4096]).unwrap();
        let at = body.as_ptr();
        assert_eq!(Lane::Adaptation.seal(body).as_ptr(), at, "the encoder left room for the lane");
    }
}
