//! The codec of every service here: prost's, with a small encode buffer.
//!
//! tonic gives each response an encode buffer of `buffer_size` for as long as the response
//! lasts, and its default (8 KiB) made that buffer most of what an idle Events or GetStats
//! stream cost berthd: about 4 of the 6 KB resident per stream, 20,000 idle streams taking
//! 124 MB. berth's messages are mostly far smaller (an event is about 100 bytes); a larger one
//! grows the buffer as it is encoded.
//!
//! Owns: the buffer settings. Does not own: encoding itself (prost, through tonic-prost).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

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
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}
