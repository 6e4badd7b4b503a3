use super::*;

fn err(data: &[u8], allow: Allow) -> String {
    match unpickle(data, allow) {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(e) => format!("at {}: {}", e.offset, e.msg),
    }
}

/// Pickler output for a value, tensors included.
fn bytes_of(v: &Value) -> Vec<u8> {
    let mut p = Pickler::new(3);
    p.value(v, &mut |p, t| p.tensor(t));
    p.finish()
}

fn storage(numel: u64) -> StorageRef {
    StorageRef { dtype: TorchDtype::BF16, key: "7".into(), numel }
}

#[test]
fn written_values_read_back() {
    let t = TensorRef { storage: storage(12), offset: 2, shape: vec![2, 5], stride: vec![5, 1] };
    let v = dict(vec![
        (
            "ints",
            list(
                [0, 255, 256, 65535, 65536, -1, i32::MIN as i64, i64::MAX, i64::MIN]
                    .map(Value::Int)
                    .to_vec(),
            ),
        ),
        ("floats", tuple(vec![Value::Float(0.8), Value::Float(-1e-10)])),
        ("text", str("héllo ✓")),
        ("raw", Value::Bytes(Rc::from(&b"\x00\xff"[..]))),
        ("flags", list(vec![Value::Bool(true), Value::Bool(false), Value::None])),
        ("tensor", Value::Tensor(Rc::new(t.clone()))),
        ("nested", dict_keyed(vec![(Key::Int(3), list(vec![])), (Key::Int(-4), tuple(vec![]))])),
    ]);
    let bytes = bytes_of(&v);
    let back = unpickle(&bytes, Allow::Torch).unwrap();
    assert_eq!(bytes_of(&back), bytes);
    let m = back.as_dict().unwrap();
    assert_eq!(m.get("tensor").unwrap().as_tensor(), Some(&t));
    assert_eq!(m.get("ints").unwrap().as_seq().unwrap()[7].as_int(), Some(i64::MAX));
    assert_eq!(m.get("text").unwrap().as_str(), Some("héllo ✓"));
}

#[test]
fn repeated_dict_keys_keep_the_last_value() {
    // {} MARK 'a' 1 'a' 2 SETITEMS STOP
    let data = b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00aK\x02u.";
    let v = unpickle(data, Allow::Torch).unwrap();
    let m = v.as_dict().unwrap();
    assert_eq!((m.len(), m.get("a").and_then(Value::as_int)), (1, Some(2)));
}

#[test]
fn only_whitelisted_globals() {
    assert!(
        err(b"\x80\x02cos\nsystem\n.", Allow::Torch).contains("GLOBAL os.system is not allowed")
    );
    assert!(err(b"\x80\x02cbuiltins\neval\n.", Allow::Torch).contains("builtins.eval"));
    // STACK_GLOBAL too, and each file kind has its own list.
    let stack = b"\x80\x04\x8c\x0dtiktoken.core\x8c\x08Encoding\x93.";
    assert!(err(stack, Allow::Torch).contains("tiktoken.core.Encoding is not allowed"));
    assert!(unpickle(stack, Allow::Tiktoken).is_ok());
    assert!(err(b"\x80\x02ccollections\nOrderedDict\n.", Allow::Tiktoken).contains("not allowed"));
    assert!(err(b"\x80\x02ctorch\nload\n.", Allow::Torch).contains("torch.load"));
}

#[test]
fn calls_are_limited_to_what_the_globals_need() {
    // OrderedDict called with arguments, NEWOBJ of anything but Encoding, REDUCE of a string.
    assert!(
        err(b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.", Allow::Torch).contains("REDUCE")
    );
    assert!(err(b"\x80\x02ccollections\nOrderedDict\n)\x81.", Allow::Torch).contains("NEWOBJ"));
    assert!(err(b"\x80\x02X\x01\x00\x00\x00a)R.", Allow::Torch).contains("REDUCE calls a str"));
    // BUILD on a plain list.
    assert!(err(b"\x80\x02]}b.", Allow::Torch).contains("BUILD on a list"));
}

#[test]
fn opcodes_outside_the_subset_are_refused() {
    for (data, what) in [
        (&b"\x80\x02i__main__\nX\n."[..], "0x69"), // INST
        (b"\x80\x02\x82\x01.", "0x82"),            // EXT1
        (b"\x80\x02S'a'\n.", "0x53"),              // STRING (text protocol)
        (b"\x80\x02P1\n.", "0x50"),                // PERSID (text)
        (b"\x80\x02K\x010.", "0x30"),              // POP
    ] {
        assert!(err(data, Allow::Torch).contains(what), "{what}");
    }
    assert!(err(b"\x80\x01N.", Allow::Torch).contains("protocol 1"));
}

#[test]
fn lengths_past_the_input_are_refused_before_allocating() {
    assert!(
        err(b"\x80\x02X\xff\xff\xff\x7fabc.", Allow::Torch).contains("declares 2147483647 bytes")
    );
    assert!(
        err(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xffab.", Allow::Torch).contains("declares")
    );
    assert!(err(b"\x80\x02J\x01\x00", Allow::Torch).contains("truncated"));
    assert!(err(b"\x80\x02", Allow::Torch).contains("truncated"));
    assert!(
        err(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.", Allow::Torch)
            .contains("64 bits")
    );
}

#[test]
fn malformed_stacks_are_refused() {
    assert!(err(b"\x80\x02t.", Allow::Torch).contains("no MARK"));
    assert!(err(b"\x80\x02a.", Allow::Torch).contains("underflow"));
    assert!(err(b"\x80\x02K\x01K\x02.", Allow::Torch).contains("STOP with 2 values"));
    assert!(err(b"\x80\x02(.", Allow::Torch).contains("STOP with 0 values"));
    assert!(err(b"\x80\x02h\x05.", Allow::Torch).contains("memo entry 5"));
    // Items below a MARK cannot be consumed by an opcode after it.
    assert!(err(b"\x80\x02](a.", Allow::Torch).contains("underflow"));
    // A list key and an odd SETITEMS.
    assert!(err(b"\x80\x02}]K\x01s.", Allow::Torch).contains("dict key of type list"));
    assert!(err(b"\x80\x02}(K\x01u.", Allow::Torch).contains("odd number"));
}

#[test]
fn nesting_is_bounded() {
    let mut data = b"\x80\x02".to_vec();
    data.extend(std::iter::repeat_n(b']', 200));
    data.extend(std::iter::repeat_n(b'a', 199));
    data.push(b'.');
    assert!(err(&data, Allow::Torch).contains("nest deeper than 64"));
    // Also through tuples of tuples.
    let mut data = b"\x80\x02)".to_vec();
    data.extend(std::iter::repeat_n(0x85, 100));
    data.push(b'.');
    assert!(err(&data, Allow::Torch).contains("nest deeper"));
}

#[test]
fn copies_of_shared_containers_are_bounded() {
    // A 1000-item list memoized, then fetched and appended to over and over: each append copies
    // it (the memo shares it). The copies run out of budget long before memory would.
    let mut data = b"\x80\x02](".to_vec();
    for _ in 0..1000 {
        data.extend(b"K\x01");
    }
    data.extend(b"eq\x00");
    for _ in 0..5000 {
        data.extend(b"h\x00Na");
    }
    data.push(b'.');
    assert!(err(&data, Allow::Torch).contains("copied more than the input size allows"));
}

/// A bf16 tensor pickle from unchecked parts.
fn tensor_pickle(key: &str, numel: i64, offset: i64, shape: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p = Pickler::new(2);
    p.tensor_parts(TorchDtype::BF16, key, numel, offset, shape, stride);
    p.finish()
}

#[test]
fn tensors_must_fit_their_storage() {
    let ok = unpickle(&tensor_pickle("0", 12, 2, &[2, 5], &[5, 1]), Allow::Torch).unwrap();
    assert_eq!(ok.as_tensor().unwrap().numel(), 10);
    // Transposed and offset views inside the storage are fine.
    assert!(unpickle(&tensor_pickle("0", 12, 0, &[3, 4], &[1, 3]), Allow::Torch).is_ok());
    for (numel, offset, shape, stride) in [
        (12, 3, &[2, 5][..], &[5, 1][..]), // one past the end
        (12, 0, &[13], &[1]),              // more elements than the storage
        (1, 0, &[1 << 40], &[0]),          // a broadcast view of 2^40 elements
        (12, 0, &[2, 2], &[1]),            // shape and stride disagree
        (i64::MAX, 0, &[1 << 32, 1 << 32], &[1 << 32, 1]), // sizes overflow
        (4, -1, &[1], &[1]),               // negative offset
    ] {
        let e = err(&tensor_pickle("0", numel, offset, shape, stride), Allow::Torch);
        assert!(e.contains("does not fit") || e.contains("offset is"), "{shape:?}: {e}");
    }
    assert!(
        err(&tensor_pickle("../x", 4, 0, &[1], &[1]), Allow::Torch).contains("not a plain name")
    );
    assert!(err(&tensor_pickle("0", -4, 0, &[1], &[1]), Allow::Torch).contains("-4 elements"));
    // Persistent ids are for torch files only.
    assert!(err(b"\x80\x02NQ.", Allow::Tiktoken).contains("persistent ids"));
}
