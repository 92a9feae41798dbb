//! How many Events and GetStats streams one uid other than root's has open at once
//! (`--max-streams-per-uid`). An idle stream costs berthd about 4 KiB (h2's stream state, the
//! subscription): one uid's 128 connections with 256 idle Events streams each took berthd's
//! RSS from 9 to 126 MB. Counted by uid, as operations and connections are: a client's
//! connections are many, its uid one.
//!
//! Owns: the count of open streams by uid and the place each stream holds. Does not own: the
//! streams (service).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The places for streams, `most` for each uid other than root's.
#[derive(Clone)]
pub struct StreamPlaces {
    most: usize,
    held: Arc<Mutex<HashMap<u32, usize>>>,
}

/// One open stream's place, given back when the stream is dropped.
pub struct StreamPlace {
    uid: u32,
    held: Arc<Mutex<HashMap<u32, usize>>>,
}

impl StreamPlaces {
    pub fn new(most: usize) -> StreamPlaces {
        StreamPlaces {
            most,
            held: Arc::default(),
        }
    }

    /// A place for a stream of `uid`; none is needed for root. RESOURCE_EXHAUSTED naming the
    /// flag when the uid has every place.
    pub fn take(&self, uid: u32) -> Result<Option<StreamPlace>> {
        if uid == 0 {
            return Ok(None);
        }
        let mut held = self.held.lock().expect("stream places poisoned");
        let open = held.entry(uid).or_default();
        if *open >= self.most {
            return Err(Error::ResourceExhausted(format!(
                "uid {uid} has {} Events and GetStats streams open, --max-streams-per-uid; end one before opening another",
                self.most
            )));
        }
        *open += 1;
        Ok(Some(StreamPlace {
            uid,
            held: Arc::clone(&self.held),
        }))
    }
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("stream places poisoned");
        if let Some(open) = held.get_mut(&self.uid) {
            *open -= 1;
            if *open == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_has_at_most_its_places_and_gets_them_back_and_root_needs_none() {
        let places = StreamPlaces::new(2);
        let first = places.take(7).unwrap();
        let _second = places.take(7).unwrap();
        let refused = places.take(7).err().expect("a third is refused");
        assert!(
            refused.to_string().contains("--max-streams-per-uid"),
            "{refused}"
        );
        assert!(places.take(8).unwrap().is_some(), "another uid has its own");
        drop(first);
        assert!(places.take(7).is_ok(), "a place given back is taken again");
        for _ in 0..10 {
            assert!(places.take(0).unwrap().is_none());
        }
        drop(places.take(9).unwrap());
        assert!(!places.held.lock().unwrap().contains_key(&9));
    }
}
