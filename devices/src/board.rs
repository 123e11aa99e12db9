//! The board's state that the devices of one exporter share: today its power, as the power
//! device last set it (a `power` device running commands, or `power-sim`). The simulated
//! console goes quiet when it is off and boots again when it comes on; a storage medium shared
//! with the board refuses writes while it is on. Every device of an exporter gets the same
//! [`Board`].

use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Board {
    power: watch::Sender<bool>,
}

impl Default for Board {
    fn default() -> Self {
        Self::new()
    }
}

impl Board {
    /// A board whose power is on (a board with no power device is taken as always on).
    pub fn new() -> Self {
        Board {
            power: watch::Sender::new(true),
        }
    }

    pub fn powered(&self) -> bool {
        *self.power.borrow()
    }

    /// Switches power; subscribers see only real changes.
    pub fn set_power(&self, on: bool) {
        self.power
            .send_if_modified(|p| std::mem::replace(p, on) != on);
    }

    /// Power changes, for a sim backend to follow.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.power.subscribe()
    }
}
