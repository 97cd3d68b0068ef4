//! Must-show 5: garbage bytes and oversized messages on every port of every replica: the
//! replica stays up and answers the next valid request.

mod common;

use common::LocalCluster;
use lockstep_proto::{Command, ExecuteRequest, client_client::ClientClient, peer_client::PeerClient};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn blast(addr: SocketAddr, bytes: &[u8]) {
    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
        let _ = s.write_all(bytes);
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
    }
}

fn garbage_payloads() -> Vec<Vec<u8>> {
    let mut out = vec![
        b"\x00\xff\x13\x37garbage\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nabc".to_vec(),
        vec![0xAB; 70_000],
    ];
    // HTTP/2 preface followed by a frame header claiming a 16 MiB frame, then junk.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
    h2.extend(std::iter::repeat_n(0x5a, 4096));
    out.push(h2);
    // A gRPC length-prefixed message claiming 4 GiB, inside an otherwise valid-looking stream.
    let mut grpc = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    grpc.extend_from_slice(&[0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00]); // empty SETTINGS
    grpc.extend_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02]);
    out.push(grpc);
    out
}

#[test]
fn garbage_and_oversized_messages_never_crash_a_replica() {
    let cluster = LocalCluster::start("garbage", 1, "kv", &["--quiet"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let members = cluster.members();
    for m in &members {
        let l = cluster.listening(m).expect("listening");
        for payload in garbage_payloads() {
            blast(l.grpc, &payload);
            blast(l.http, &payload);
        }
        let ep = format!("http://{}", l.grpc);
        rt.block_on(async {
            // Oversized gRPC request: refused with an error, not a crash.
            let mut c = ClientClient::new(common::connect(&cluster.transport(), &ep).await.expect("connect"))
                .max_encoding_message_size(64 * 1024 * 1024);
            let big = ExecuteRequest {
                command: Some(Command {
                    client_id: "big".into(),
                    sequence: 1,
                    payload: vec![b'x'; 20 * 1024 * 1024],
                }),
            };
            let err = c.execute(big).await.expect_err("oversized request must be refused");
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::OutOfRange
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::Internal
                        | tonic::Code::Unknown
                ),
                "unexpected code for an oversized request: {err:?}"
            );
            // Valid protobuf, nonsense command: a clear INVALID_ARGUMENT (or NOT_PRIMARY on a backup).
            let bad = ExecuteRequest {
                command: Some(Command {
                    client_id: "bad".into(),
                    sequence: 1,
                    payload: b"\xff\xfe not json".to_vec(),
                }),
            };
            let err = c.execute(bad).await.expect_err("malformed command");
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ),
                "{err:?}"
            );
            // A command just over the 1 MiB command limit (but under the message limit).
            let over = ExecuteRequest {
                command: Some(Command {
                    client_id: "over".into(),
                    sequence: 1,
                    payload: vec![b' '; 1024 * 1024 + 1],
                }),
            };
            let err = c.execute(over).await.expect_err("over the command limit");
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ),
                "{err:?}"
            );
            // The same over a client session: each request gets its error as an answer, an
            // empty request too, and an oversized message ends the session with an error.
            session_garbage(&mut c).await;
            // Garbage peer traffic: an Append with no machine and an absurd epoch-less body.
            // From a member (a client's certificate may not call the peer service).
            let peer = members.iter().find(|o| *o != m).expect("another member");
            let mut p = PeerClient::new(
                common::connect(&cluster.replica_transport(peer), &ep)
                    .await
                    .expect("connect peer"),
            );
            let r = p
                .append(lockstep_proto::AppendRequest::default())
                .await
                .expect("answered");
            assert!(!r.into_inner().success);
        });
    }
    // Every replica is still the same process and the cluster serves valid requests.
    for m in &members {
        let pid = cluster.pid(m);
        assert!(nix::sys::signal::kill(pid, None).is_ok(), "replica {m} died");
    }
    let mut client = cluster.client();
    rt.block_on(client.put("after", "garbage"))
        .expect("valid write after garbage");
    assert_eq!(
        rt.block_on(client.get("after")).expect("read").as_deref(),
        Some("garbage")
    );
    for m in &members {
        let l = cluster.listening(m).expect("listening");
        let body = common::http_get(l.http, "/healthz");
        assert!(body.contains("200"), "{m} /healthz after garbage: {body}");
    }
}

/// Malformed, empty and oversized requests on a client session (`Client/Session`).
async fn session_garbage(c: &mut ClientClient<tonic::transport::Channel>) {
    use lockstep_proto::{SessionRequest, session_request::Kind as Asked, session_response::Kind as Answer};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = c
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("open a session")
        .into_inner();
    let bad = Asked::Execute(ExecuteRequest {
        command: Some(Command {
            client_id: "bad-session".into(),
            sequence: 1,
            payload: b"\xff\xfe not json".to_vec(),
        }),
    });
    for (id, kind) in [(1, Some(bad)), (2, None)] {
        tx.send(SessionRequest { id, kind }).await.expect("send");
        let answer = answers
            .message()
            .await
            .expect("an answer")
            .expect("the session is open");
        assert_eq!(answer.id, id);
        let Some(Answer::Error(e)) = answer.kind else {
            panic!("request {id}: expected an error answer, got {answer:?}")
        };
        let code = tonic::Code::from_i32(e.code);
        assert!(
            matches!(code, tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition),
            "request {id}: {e:?}"
        );
    }
    let big = Asked::Execute(ExecuteRequest {
        command: Some(Command {
            client_id: "big-session".into(),
            sequence: 1,
            payload: vec![b'x'; 20 * 1024 * 1024],
        }),
    });
    tx.send(SessionRequest { id: 3, kind: Some(big) }).await.expect("send");
    let ended = answers
        .message()
        .await
        .expect_err("an oversized message ends the session");
    assert!(
        matches!(
            ended.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal | tonic::Code::Unknown
        ),
        "unexpected end of an oversized session: {ended:?}"
    );
}
