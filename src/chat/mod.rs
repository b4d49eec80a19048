//! The `sotto chat` screen as a library: [`state`] is a pure state machine fed with key
//! presses and the running node's JSON (contacts, history, events, send results), and
//! [`view`] draws it with ratatui. Neither reads the terminal, the socket or the clock;
//! the binary's driver (`cli/chat.rs`) does, and passes `now` in.

pub mod state;
pub mod view;

pub use state::{Action, ChatState};
pub use view::render;
