//! Inputs the fuzz targets in fuzz/ found, each with the clear answer it gets now.
//! docs/FUZZING.md records the runs that found them.

mod heap;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use sotto::control::{answer, bind, connect_raw, serve, socket_path, Handler, RpcError, INVALID_REQUEST, METHOD_NOT_FOUND};
use sotto::exit::ExitClass;
use sotto::rendezvous::proto::{Request, Response, MAX_FRAME, MAX_ONLINE_LIST};
use sotto::wire::{decode_message, WireError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A handler that knows no method: the requests below never reach one.
struct NoMethods;

impl Handler for NoMethods {
    async fn call(&self, method: String, _params: Value) -> Result<Value, RpcError> {
        Err(RpcError { code: METHOD_NOT_FOUND, message: format!("no method {method:?}"), exit: ExitClass::Usage })
    }
}

/// control_rpc, 2026-11-21: a request whose id is an object (and that has no method)
/// was answered with that object as the id. JSON-RPC 2.0 allows only a number, a string
/// or null, and requires null when the request's id cannot be used.
#[tokio::test]
async fn an_id_that_is_not_a_number_or_string_is_answered_with_null() {
    let found: &[u8] = concat!(
        "{\"jsonrpc\": \"2.0\", \"id\": {",
        "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
        "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
        "}}\n"
    )
    .as_bytes();
    assert_eq!(found.len(), 92);
    let v = answer(&NoMethods, found).await.expect("an invalid request is answered");
    assert_eq!(v["id"], Value::Null);
    assert_eq!(v["error"]["code"], INVALID_REQUEST);
    assert_eq!(v["error"]["message"], "no method");

    // Every invalid-request path, with every id that is not a number or a string.
    for id in [json!({}), json!([1]), json!(true), json!({"a": 1})] {
        for request in [
            json!({ "jsonrpc": "2.0", "id": id }),
            json!({ "jsonrpc": "1.0", "id": id, "method": "status" }),
            json!({ "jsonrpc": "2.0", "id": id, "method": "status" }),
        ] {
            let v = answer(&NoMethods, request.to_string().as_bytes()).await.expect("answered");
            assert_eq!((&v["id"], &v["error"]["code"]), (&Value::Null, &json!(INVALID_REQUEST)), "{request}");
        }
    }
    // Valid ids still come back as they were sent.
    for id in [json!(7), json!("seven")] {
        let v = answer(&NoMethods, json!({ "jsonrpc": "2.0", "id": id }).to_string().as_bytes()).await.expect("answered");
        assert_eq!((&v["id"], &v["error"]["code"]), (&id, &json!(INVALID_REQUEST)));
    }
}

/// The same for `subscribe`, which the connection loop serves itself: an object id makes
/// it an invalid request, answered with null, and no subscription.
#[tokio::test]
async fn subscribe_with_an_object_id_is_an_invalid_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir.path().join("run"), Path::new("/some/profile"));
    let server = tokio::spawn(serve(bind(&path).await.unwrap(), Arc::new(NoMethods)));
    let (read, mut write) = connect_raw(&path).await.expect("connects").into_split();
    let mut lines = BufReader::new(read).lines();
    let mut ask = async |line: &str| {
        write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        serde_json::from_str::<Value>(&lines.next_line().await.unwrap().expect("an answer")).unwrap()
    };
    let v = ask(r#"{"jsonrpc":"2.0","id":{"x":1},"method":"subscribe"}"#).await;
    assert_eq!((&v["id"], &v["error"]["code"]), (&Value::Null, &json!(INVALID_REQUEST)), "{v}");
    let v = ask(r#"{"jsonrpc":"2.0","id":3,"method":"subscribe"}"#).await;
    assert_eq!((&v["id"], &v["result"]), (&json!(3), &json!({ "subscribed": false })), "{v}");
    server.abort();
}

/// rendezvous_request, 2026-11-21 (once the targets bounded a decoder's heap by its
/// input): a `Watch` whose count claims 913 names, in a 1037-byte message, made serde
/// reserve 24 bytes per name before the names were read: 22 KiB. At the frame cap the
/// same reservation is 786 KiB, 65 times what the 500-name cap needs. A username list
/// now reserves room for at most 500 names, and a longer one does not decode.
#[test]
fn a_claimed_list_length_reserves_no_more_than_the_cap() {
    let found: &[u8] = b"\x01\x08\x91\x07dacarol\x07davpbol\x07dacarml\x07dacarol\x07dapbob\x07davpbob\x05carol\x07dacarol\x07dav\
        pbol\x07dacarol\x07dacarol\x07davpbol\x07dacarob\x07davpbob\x05carol\x07dacarsl\x07davpbob\x05ob66a\x05c\
        arol\x07dacarol\x07davpbol\x07dacarol\x07dacarob\x05carol\x07dacarol\x07davpbol\x07dacarol\x07dacarol\
        \x07davpbol\x07dacarol\x07davpbob\x07davpbol\x07dacarol\x07davpbob\x07davpb\x00\x00\x00\x00\x00\x00\x00\
        \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
        \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00ob\x05carol\x07dacarol\x07dacb\x07davpbob\x05car\
        ol\x07dacarol\x07dacarol\x07davpbol\x07dacarol\x07davpbob\x07davpbob\x05carol\x07dacarob\x05ob66a\x05car\
        ol\x07dacarol\x07davpbol\x07dacarol\x07dacarob\x05carolarol\x07dacarol\x07davpbol\x07dacarol\x07dacarol\
        \x07davpbol\x07dacarob\x07davpbob\x05carol\x07dacarsl\x07davpbob\x05ob66a\x05carol\x07dacarol\x07davpbol\
        \x07dacarol\x07dacarob\x05carol\x07dacarol\x07davpbol\x07dacarol\x07dacarol\x07davpbol\x07dacarol\x07dav\
        pbob\x07davpbol\x07dacarol\x07davpbob\x07davpb\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
        \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
        \x00\x00\x00\x00\x00\x00\x00ob\x05carol\x07dacarol\x07dacb\x07davpbob\x05carol\x07dacarol\x07dacarol\x07\
        davpbol\x07dacarol\x07davpbob\x07davpbob\x05carol\x07dacarob\x05ob66a\x05carol\x07dacarol\x07davpbol\x07\
        dacarol\x07dacarob\x05carol\x07dabarol\x07davpbol\x07dacarml\x07dacarol\x07davpbol\x07dacarol\x07davpbob\
        \x07davpbo\x07dabarol\x07davpbol\x07dacarml\x07dacarol\x07davpbol\x07dacarol\x07davpbob\x07davpbob\x05ca\
        rol\x07dacarol\x07davpbob\x05ob65a\x05b\x05c[a";
    assert_eq!(found.len(), 1037);
    let (decoded, held) = heap::peak_heap(|| decode_message::<Request>(found));
    assert_eq!(decoded, Err(WireError::Malformed), "a name in the list holds NUL bytes");
    assert!(held <= heap::heap_bound(found.len()), "{} bytes held {held} bytes", found.len());

    // The same at the frame cap, for each of the three lists: 01 ‖ Watch (8), Online (7)
    // or Watching (9) ‖ a count of 32763 ‖ 32763 bytes that are no names.
    let garbage = vec![0xffu8; MAX_FRAME - 5];
    for tag in [8u8, 7, 9] {
        let bytes = [&[1, tag, 0xfb, 0xff, 0x01][..], &garbage].concat();
        assert_eq!(bytes.len(), MAX_FRAME);
        let (decoded, held) = heap::peak_heap(|| match tag {
            8 => decode_message::<Request>(&bytes).map(|_| ()),
            _ => decode_message::<Response>(&bytes).map(|_| ()),
        });
        assert_eq!(decoded, Err(WireError::Malformed));
        assert!(held <= MAX_ONLINE_LIST * 24 + 1024, "a claimed list held {held} bytes");
    }
}
