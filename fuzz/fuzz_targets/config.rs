//! Parse + validate + compile on arbitrary bytes: an error is fine, a panic
//! is a bug, and whatever validates must compile and pick a route.
#![no_main]

use std::path::PathBuf;

use legate::config::Config;
use legate::table::{self, ListenerKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_sources([(PathBuf::from("fuzz.yaml"), Ok(text.to_string()))])
    else {
        return;
    };
    let table = match table::compile(&config, &Default::default(), 1, None) {
        Ok(t) => t,
        Err(e) => panic!("validated but did not compile: {e}"),
    };
    for l in &table.listeners {
        if let ListenerKind::Tcp(tcp) = &l.kind {
            let _ = tcp.target.pick();
        }
    }
});
