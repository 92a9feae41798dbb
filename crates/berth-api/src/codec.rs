//! The codec of every service here: prost's, with a small encode buffer, and a request that
//! does not decode refused as the client's error.
//!
//! tonic gives each response an encode buffer of `buffer_size` for as long as the response
//! lasts, and its default (8 KiB) made that buffer most of what an idle Events or GetStats
//! stream cost berthd: about 4 of the 6 KB resident per stream, 20,000 idle streams taking
//! 124 MB. berth's messages are mostly far smaller (an event is about 100 bytes); a larger one
//! grows the buffer as it is encoded.
//!
//! tonic-prost answers a message that does not decode with INTERNAL, as grpc-go and grpc-java
//! do, for requests as for responses. berthd keeps INTERNAL for its own faults: bytes a client
//! sent that are not the request they claim to be are INVALID_ARGUMENT, with prost's account of
//! where they went wrong. A response that does not decode stays INTERNAL.
//!
//! Owns: the buffer settings, the status of a message that does not decode. Does not own:
//! encoding or decoding itself (prost, through tonic-prost).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// Which way a message goes: implemented (by `build.rs`) for every message an RPC takes or
/// returns.
pub trait Direction {
    /// Whether clients send it.
    const IS_REQUEST: bool;
}

include!(concat!(env!("OUT_DIR"), "/directions.rs"));

/// Each response's encode buffer to start with: room for an event or a small reply.
const ENCODE_BUFFER_BYTES: usize = 512;
/// How much a streaming response encodes before handing it to HTTP/2 (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// prost's codec with [`ENCODE_BUFFER_BYTES`] for each response's encode buffer; decoding is
/// prost's unchanged.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Direction + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder {
            _message: PhantomData,
        }
    }
}

/// prost's decoding, with the status of [`decode_error`].
#[derive(Debug)]
pub struct MessageDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: Message + Default + Direction> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(decode_error::<U>)
    }
}

/// INVALID_ARGUMENT for a request, INTERNAL for a response, with prost's text ("failed to decode
/// Protobuf message: StateRequest.id: invalid string value: data is not UTF-8 encoded").
fn decode_error<U: Direction>(error: prost::DecodeError) -> Status {
    if U::IS_REQUEST {
        Status::invalid_argument(error.to_string())
    } else {
        Status::internal(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{StateRequest, StateResponse};

    #[test]
    fn a_request_that_does_not_decode_is_the_clients_error_and_a_response_is_not() {
        // Field 1 (the id) as a string of three bytes that are not UTF-8.
        let bytes: &[u8] = &[0x0a, 0x03, 0xff, 0xfe, 0xfd];
        let request = decode_error::<StateRequest>(StateRequest::decode(bytes).unwrap_err());
        assert_eq!(request.code(), tonic::Code::InvalidArgument);
        assert!(
            request
                .message()
                .starts_with("failed to decode Protobuf message: StateRequest.id: "),
            "{}",
            request.message()
        );
        let response =
            decode_error::<StateResponse>(StateResponse::decode(&[0x0f][..]).unwrap_err());
        assert_eq!(response.code(), tonic::Code::Internal);
    }
}
