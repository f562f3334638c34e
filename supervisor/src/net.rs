//! The sockets under the TCP transport: tokio's for the product, turmoil's in the simulation.

use async_trait::async_trait;
use std::io;
use tokio::io::{AsyncRead, AsyncWrite};

/// Opens listeners and connections.
#[async_trait]
pub trait Net: Send + Sync + 'static {
    /// A connected stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Its reading half, owned apart.
    type ReadHalf: AsyncRead + Unpin + Send + 'static;
    /// Its writing half, owned apart.
    type WriteHalf: AsyncWrite + Unpin + Send + 'static;
    /// A bound listener.
    type Listener: Send + Sync + 'static;

    /// Binds `addr`.
    async fn bind(&self, addr: &str) -> io::Result<Self::Listener>;
    /// Waits for the next connection; returns it with the peer's address.
    async fn accept(&self, listener: &Self::Listener) -> io::Result<(Self::Stream, String)>;
    /// Connects to `addr`.
    async fn connect(&self, addr: &str) -> io::Result<Self::Stream>;
    /// Splits a stream into halves that share no lock: the reader and the writers of one
    /// connection poll the socket at once. (`tokio::io::split` takes a lock around each poll,
    /// which every frame read and written paid.)
    fn split(stream: Self::Stream) -> (Self::ReadHalf, Self::WriteHalf);
}

/// The operating system's TCP.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioNet;

#[async_trait]
impl Net for TokioNet {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;
    type ReadHalf = tokio::net::tcp::OwnedReadHalf;
    type WriteHalf = tokio::net::tcp::OwnedWriteHalf;

    fn split(stream: Self::Stream) -> (Self::ReadHalf, Self::WriteHalf) {
        stream.into_split()
    }

    async fn bind(&self, addr: &str) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
    }

    async fn accept(&self, listener: &Self::Listener) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = listener.accept().await?;
        // Small request/response frames: do not wait to fill a segment.
        stream.set_nodelay(true)?;
        Ok((stream, peer.to_string()))
    }

    async fn connect(&self, addr: &str) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
