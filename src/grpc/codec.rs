//! The protobuf codec of every generated service and client: prost's, except that a message
//! that does not decode (a string field that is not UTF-8, a truncated or malformed body) is
//! the caller's INVALID_ARGUMENT with a field violation on `request`, not INTERNAL — which
//! Tally keeps for its own bugs.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::domain::FieldViolation;
use crate::ledger::ServiceError;

/// prost's codec with request decode errors mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decoder; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == tonic::Code::Internal {
                crate::grpc::status::to_status(&ServiceError::Invalid(vec![FieldViolation::new(
                    "request",
                    format!(
                        "is not a valid protobuf message (strings must be UTF-8): {}",
                        s.message()
                    ),
                )]))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
