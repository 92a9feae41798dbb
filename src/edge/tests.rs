use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// The wrapper passes what the rewriter produces, in both directions, and closes on an error.
#[tokio::test]
async fn the_wrapper_rewrites_reads_and_passes_writes() {
    let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut edge = Edge::new(
        crate::listener::ApiSocket::new(server.into()).unwrap(),
        std::time::Duration::from_secs(10),
    );
    let peer = edge
        .connect_info()
        .credentials
        .0
        .expect("the peer's credentials pass through");
    assert_eq!(peer.pid(), std::process::id() as i32);
    let client = tokio::net::UnixStream::from_std(client).unwrap();
    let (mut client_read, mut client_write) = client.into_split();

    let mut wire = frames::PREFACE.to_vec();
    // HEADERS on stream 1: :method POST, :authority "/s" as a literal.
    wire.extend_from_slice(&[0, 0, 5, 0x1, 0x4, 0, 0, 0, 1, 0x83, 0x01, 0x02, b'/', b's']);
    client_write.write_all(&wire).await.unwrap();
    let mut got = vec![0; frames::PREFACE.len() + 9];
    edge.read_exact(&mut got).await.unwrap();
    let length = usize::from(got[got.len() - 7]);
    let mut block = vec![0; length];
    edge.read_exact(&mut block).await.unwrap();
    let headers = loona_hpack::Decoder::new().decode(&block).unwrap();
    assert_eq!(headers[1], (b":authority".to_vec(), b"localhost".to_vec()));

    edge.write_all(b"answer").await.unwrap();
    let mut answer = [0; 6];
    client_read.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"answer");

    // A CONTINUATION with no block open.
    client_write
        .write_all(&[0, 0, 1, 0x9, 0x4, 0, 0, 0, 1, 0x82])
        .await
        .unwrap();
    assert!(edge.read(&mut [0; 16]).await.is_err());
    assert!(edge.read(&mut [0; 16]).await.is_err(), "stays closed");
}
