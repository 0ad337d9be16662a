//! A minimal PostgreSQL stand-in for the pools' tests: startup, simple
//! queries, a way to hang up.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_postgres::Config as PgConfig;

/// Speaks just enough of the protocol for tokio-postgres: trust
/// authentication, and `CommandComplete` + `ReadyForQuery` for every
/// simple query; the query `bye` makes it hang up.
pub(crate) struct FakePostgres {
    pub(crate) addr: SocketAddr,
    /// Client addresses, in the order they connected.
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = i32::try_from(body.len() + 4).expect("small message");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub(crate) async fn serve(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> io::Result<()> {
    loop {
        let len = usize::try_from(stream.read_i32().await?).unwrap_or(0);
        let mut body = vec![0; len.saturating_sub(4)];
        stream.read_exact(&mut body).await?;
        // SSLRequest: no TLS here; the client goes on in plain text.
        if body.get(..4) == Some(&80877103i32.to_be_bytes()[..]) {
            stream.write_all(b"N").await?;
            continue;
        }
        break;
    }
    let mut hello = message(b'R', &0i32.to_be_bytes());
    hello.extend(message(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    hello.extend(message(b'Z', b"I"));
    stream.write_all(&hello).await?;
    loop {
        let tag = stream.read_u8().await?;
        let len = usize::try_from(stream.read_i32().await?).unwrap_or(0);
        let mut body = vec![0; len.saturating_sub(4)];
        stream.read_exact(&mut body).await?;
        match tag {
            b'Q' if body.starts_with(b"bye") => return Ok(()),
            b'Q' => {
                let mut reply = message(b'C', b"SELECT 0\0");
                reply.extend(message(b'Z', b"I"));
                stream.write_all(&reply).await?;
            }
            b'X' => return Ok(()),
            _ => {}
        }
    }
}

impl FakePostgres {
    pub(crate) async fn start() -> FakePostgres {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let addr = listener.local_addr().expect("addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&peers);
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                seen.lock().expect("peers").push(peer);
                tokio::spawn(serve(stream));
            }
        });
        FakePostgres { addr, peers }
    }

    pub(crate) fn config(&self) -> PgConfig {
        let mut config = PgConfig::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user("app")
            .dbname("shop");
        config
    }

    pub(crate) fn peer(&self, i: usize) -> SocketAddr {
        self.peers.lock().expect("peers")[i]
    }
}

/// The `local_address` and `fd` a message names.
pub(crate) fn named(msg: &Value) -> (Option<String>, Option<i64>) {
    (
        msg["local_address"].as_str().map(str::to_string),
        msg["fd"].as_i64(),
    )
}
