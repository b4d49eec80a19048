//! Draws a [`ChatState`] with ratatui: a red banner while any contact's key changed,
//! contacts on the left, the conversation on the right, the input line and a status
//! line below. Text from peers is shown only through [`printable`]. Draws, reads nothing.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, List, ListItem, ListState, Paragraph};
use ratatui::Frame;

use super::state::{ChatState, Delivery, Direction, Message};
use crate::app::printable;

/// Key hints on the status line.
const HELP: &str = "Enter send · ↑↓ contact · /help · Esc quit";
/// Columns of the time before a message; continuation lines are indented as far.
const TIME_WIDTH: usize = 9;
/// The banner never takes more rows than this.
const MAX_BANNER_ROWS: usize = 4;

/// Styles, with or without colour (`NO_COLOR`): warnings stay bold and reversed.
struct Palette {
    colour: bool,
}

impl Palette {
    fn pick(&self, colour: Style, mono: Style) -> Style {
        if self.colour {
            colour
        } else {
            mono
        }
    }

    fn bold(&self, colour: Color) -> Style {
        self.pick(Style::new().fg(colour).add_modifier(Modifier::BOLD), Style::new().add_modifier(Modifier::BOLD))
    }

    fn plain(&self, colour: Color) -> Style {
        self.pick(Style::new().fg(colour), Style::new())
    }

    fn dim(&self) -> Style {
        self.pick(Style::new().fg(Color::DarkGray), Style::new().add_modifier(Modifier::DIM))
    }

    fn banner(&self) -> Style {
        self.pick(
            Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD),
            Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED),
        )
    }

    fn warning(&self) -> Style {
        self.bold(Color::Red)
    }
}

pub fn render(frame: &mut Frame, state: &ChatState) {
    let palette = Palette { colour: state.colour() };
    let area = frame.area();
    let banner = banner(state, &palette, area.width);
    let [banner_area, main, input_area, status_area] =
        Layout::vertical([Constraint::Length(banner.len() as u16), Constraint::Min(3), Constraint::Length(3), Constraint::Length(1)])
            .areas(area);
    if !banner.is_empty() {
        frame.render_widget(Paragraph::new(banner).style(palette.banner()), banner_area);
    }
    // Room for "● name ✔ (99)", and for the title " me · contacts ".
    let longest = state.contacts().iter().map(|c| c.name.len() + 10).max().unwrap_or(0).max(state.me().map_or(0, |m| m.len() + 13));
    let list_width = (longest as u16 + 2).clamp(18, (area.width / 3).max(18));
    let [contacts_area, conversation_area] = Layout::horizontal([Constraint::Length(list_width), Constraint::Min(10)]).areas(main);
    contacts(frame, state, &palette, contacts_area);
    conversation(frame, state, &palette, conversation_area);
    input(frame, state, input_area);
    status(frame, state, &palette, status_area);
}

/// The key-change warning, wrapped to the screen; empty when no key changed.
fn banner(state: &ChatState, palette: &Palette, width: u16) -> Vec<Line<'static>> {
    let changed: Vec<&str> = state.changed_keys().collect();
    let Some(first) = changed.first() else { return Vec::new() };
    let text = format!(
        "⚠ KEY CHANGED: {} presented an identity key that is not the one you pinned. Someone may be impersonating them. \
         Messages are refused until you compare safety numbers: sotto contact verify {first}",
        changed.join(", ")
    );
    let mut lines = wrap(&[(&text, palette.banner())], width, 2);
    lines.truncate(MAX_BANNER_ROWS);
    lines
}

fn contacts(frame: &mut Frame, state: &ChatState, palette: &Palette, area: Rect) {
    let title = match state.me() {
        Some(me) => format!(" {me} · contacts "),
        None => " contacts ".to_string(),
    };
    let block = Block::bordered().title(title);
    if state.contacts().is_empty() {
        let hint = Paragraph::new(vec![Line::styled("none yet:", palette.dim()), Line::styled("/chat USER", palette.dim())]);
        frame.render_widget(hint.block(block), area);
        return;
    }
    let items: Vec<ListItem> = state
        .contacts()
        .iter()
        .map(|c| {
            let dot = match c.online {
                Some(true) => Span::styled("●", palette.bold(Color::Green)),
                Some(false) => Span::styled("○", palette.dim()),
                None => Span::styled("◌", palette.dim()),
            };
            let mut first = vec![dot, Span::raw(" "), Span::raw(c.name.clone())];
            if c.verified {
                first.push(Span::styled(" ✔", palette.plain(Color::Green)));
            }
            if c.unread > 0 {
                first.push(Span::styled(format!(" ({})", c.unread), palette.bold(Color::Yellow)));
            }
            let mut lines = vec![Line::from(first)];
            if c.key_changed {
                lines.push(Line::styled("  KEY CHANGED", palette.warning()));
            }
            ListItem::new(Text::from(lines))
        })
        .collect();
    let selected = state.selected().and_then(|s| state.contacts().iter().position(|c| c.name == s));
    let list = List::new(items).block(block).highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    frame.render_stateful_widget(list, area, &mut ListState::default().with_selected(selected));
}

fn conversation(frame: &mut Frame, state: &ChatState, palette: &Palette, area: Rect) {
    let Some(peer) = state.selected() else {
        let hint = "No conversation open: pick a contact with ↑/↓, or type /chat USER and press Enter.";
        let block = Block::bordered().title(" sotto ");
        let inner = block.inner(area);
        frame.render_widget(block, area);
        frame.render_widget(Paragraph::new(wrap(&[(hint, palette.dim())], inner.width, 0)), inner);
        return;
    };
    let contact = state.contact(peer);
    let presence = match contact.and_then(|c| c.online) {
        Some(true) => "online",
        Some(false) => "offline",
        None => "presence unknown",
    };
    let verified = if contact.is_some_and(|c| c.verified) { "verified" } else { "unverified" };
    let mut title = vec![Span::raw(format!(" {peer} · {presence} · {verified} "))];
    if contact.is_some_and(|c| c.key_changed) {
        title.push(Span::styled(" KEY CHANGED ", palette.banner()));
    }
    let mut block = Block::bordered().title(Line::from(title));
    let messages = state.conversation(peer);
    let inner = block.inner(area);
    if messages.is_empty() {
        frame.render_widget(block, area);
        let hint = format!("No messages with {peer} yet. Type below and press Enter.");
        frame.render_widget(Paragraph::new(wrap(&[(&hint, palette.dim())], inner.width, 0)), inner);
        return;
    }
    let me = state.me().unwrap_or("me");
    let rendered: Vec<Vec<Line>> = messages.iter().map(|m| message_lines(m, me, peer, palette, inner.width)).collect();
    // Scrolled up by `scroll` messages, but never so far that the pane is not full.
    let height = usize::from(inner.height);
    let mut end = messages.len() - state.scroll().min(messages.len());
    while end < messages.len() && rendered[..end].iter().map(Vec::len).sum::<usize>() < height {
        end += 1;
    }
    let hidden = messages.len() - end;
    if hidden > 0 {
        block = block.title_bottom(Line::from(format!(" ↓ {hidden} newer (PgDn) ")).right_aligned());
    }
    frame.render_widget(block, area);
    let lines: Vec<Line> = rendered.into_iter().take(end).flatten().collect();
    let start = lines.len().saturating_sub(height);
    frame.render_widget(Paragraph::new(lines[start..].to_vec()), inner);
}

/// `HH:MM:SS name: body mark`, wrapped under the time.
fn message_lines(m: &Message, me: &str, peer: &str, palette: &Palette, width: u16) -> Vec<Line<'static>> {
    let time = format!("{} ", m.clock());
    let who = match m.direction {
        Direction::Out => (format!("{me}: "), palette.bold(Color::Blue)),
        Direction::In => (format!("{peer}: "), palette.bold(Color::Cyan)),
    };
    let body = printable(&m.body).replace('\t', "    ");
    let mark = match (m.direction, m.state) {
        (Direction::Out, Delivery::Delivered) => Some((" ✓", palette.plain(Color::Green))),
        (Direction::Out, Delivery::Pending) => Some((" … sending", palette.plain(Color::Yellow))),
        (Direction::Out, Delivery::Failed) => Some((" ✗ not delivered", palette.warning())),
        _ => None,
    };
    let mut pieces = vec![(time.as_str(), palette.dim()), (who.0.as_str(), who.1), (body.as_str(), Style::new())];
    pieces.extend(mark);
    wrap(&pieces, width, TIME_WIDTH)
}

fn input(frame: &mut Frame, state: &ChatState, area: Rect) {
    let title = match state.selected() {
        Some(peer) => format!(" message to {peer} "),
        None => " /chat USER opens a conversation ".to_string(),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    // The end of what is typed, as much as fits before the cursor.
    let text = printable(state.input());
    let room = usize::from(inner.width).saturating_sub(1);
    let mut shown = String::new();
    let mut used = 0;
    for c in text.chars().rev() {
        let w = char_width(c);
        if used + w > room {
            break;
        }
        used += w;
        shown.insert(0, c);
    }
    frame.render_widget(Paragraph::new(shown), inner);
    if inner.width > 0 && inner.height > 0 {
        frame.set_cursor_position((inner.x + used as u16, inner.y));
    }
}

fn status(frame: &mut Frame, state: &ChatState, palette: &Palette, area: Rect) {
    let notice = state.notice().map(|notice| {
        let style = if notice.loud { palette.warning() } else { Style::new() };
        Line::from(vec![Span::styled(format!("{} ", notice.time), palette.dim()), Span::styled(notice.text.clone(), style)])
    });
    // The notice first; the key hints where there is room left.
    let help = Line::styled(HELP, palette.dim());
    let used = notice.as_ref().map_or(0, |n| n.width() + 2);
    if used + help.width() <= usize::from(area.width) {
        let [_, right] = Layout::horizontal([Constraint::Min(0), Constraint::Length(help.width() as u16)]).areas(area);
        frame.render_widget(Paragraph::new(help), right);
    }
    if let Some(notice) = notice {
        frame.render_widget(Paragraph::new(notice), area);
    }
}

fn char_width(c: char) -> usize {
    let mut buf = [0u8; 4];
    Span::raw(&*c.encode_utf8(&mut buf)).width()
}

/// Lays styled text out in rows of at most `width` columns, breaking after a space
/// where a word fits on the next row; rows after the first (and after a `\n`) start
/// with `indent` spaces.
fn wrap(pieces: &[(&str, Style)], width: u16, indent: usize) -> Vec<Line<'static>> {
    let width = usize::from(width).max(1);
    let indent = if indent * 2 > width { 0 } else { indent };
    let mut lines = Vec::new();
    let mut row: Vec<(char, Style)> = Vec::new();
    let mut row_width = 0;
    // Where this row's own text starts (after the indent), and whether it continues a
    // soft-wrapped row (then a leading space is dropped).
    let mut start = 0;
    let mut soft = false;
    for &(text, style) in pieces {
        for c in text.chars() {
            if c == '\n' {
                lines.push(to_line(&row));
                row = vec![(' ', Style::new()); indent];
                (row_width, start, soft) = (indent, indent, false);
                continue;
            }
            if c == ' ' && soft && row.len() == start {
                continue;
            }
            let w = char_width(c);
            if row_width + w > width && row.len() > start {
                let carry = match row[start..].iter().rposition(|(ch, _)| *ch == ' ') {
                    Some(i) => row.split_off(start + i + 1),
                    None => Vec::new(),
                };
                let carry_width: usize = carry.iter().map(|(ch, _)| char_width(*ch)).sum();
                let carry = if indent + carry_width + w <= width {
                    carry
                } else {
                    // The word does not fit on a row of its own: break it here.
                    row.extend(carry);
                    Vec::new()
                };
                lines.push(to_line(&row));
                row = vec![(' ', Style::new()); indent];
                row.extend(carry);
                row_width = row.iter().map(|(ch, _)| char_width(*ch)).sum();
                (start, soft) = (indent, true);
                if c == ' ' && row.len() == start {
                    continue;
                }
            }
            row.push((c, style));
            row_width += w;
        }
    }
    if row.len() > start || lines.is_empty() {
        lines.push(to_line(&row));
    }
    lines
}

/// Joins runs of equally styled characters into spans.
fn to_line(row: &[(char, Style)]) -> Line<'static> {
    let mut spans: Vec<Span<'static>> = Vec::new();
    let mut text = String::new();
    let mut style = row.first().map(|(_, s)| *s).unwrap_or_default();
    for &(c, s) in row {
        if s != style && !text.is_empty() {
            spans.push(Span::styled(std::mem::take(&mut text), style));
        }
        style = s;
        text.push(c);
    }
    if !text.is_empty() {
        spans.push(Span::styled(text, style));
    }
    Line::from(spans)
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::Terminal;
    use serde_json::{json, Value};

    use super::*;
    use crate::chat::Action;

    const W: u16 = 80;
    const H: u16 = 20;

    fn screen(state: &ChatState) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(W, H)).unwrap();
        terminal.draw(|frame| render(frame, state)).unwrap();
        let buffer = terminal.backend().buffer();
        let rows: Vec<String> = (0..H).map(|y| (0..W).map(|x| buffer[(x, y)].symbol()).collect::<String>()).collect();
        rows
    }

    /// Fails, showing the screen, unless some row contains `text`.
    #[track_caller]
    fn shows(rows: &[String], text: &str) {
        assert!(rows.iter().any(|r| r.contains(text)), "{text:?} is not on the screen:\n{}", rows.join("\n"));
    }

    /// The row that contains `text`, or a failure that shows the screen.
    #[track_caller]
    fn row<'a>(rows: &'a [String], text: &str) -> &'a str {
        rows.iter().find(|r| r.contains(text)).unwrap_or_else(|| panic!("{text:?} is not on the screen:\n{}", rows.join("\n")))
    }

    fn press(state: &mut ChatState, code: KeyCode) -> Option<Action> {
        state.handle_key(KeyEvent::new(code, KeyModifiers::NONE), 1_767_261_600_000)
    }

    fn message(peer: &str, id: &str, direction: &str, body: &str, state: &str, at: &str) -> Value {
        json!({ "id": id, "peer": peer, "direction": direction, "body": body, "sent_at": at, "stored_at": at, "state": state })
    }

    fn alice_with_bob_and_carol() -> ChatState {
        let mut state = ChatState::new();
        state.apply_status(&json!({ "username": "alice" }));
        state.apply_contacts(&json!({ "contacts": [
            { "username": "bob", "verified": true, "online": true, "key_changed": false },
            { "username": "carol", "verified": false, "online": false, "key_changed": false },
        ]}));
        state
    }

    #[test]
    fn chat_screen_shows_a_sent_and_a_received_message_with_their_states() {
        let mut state = alice_with_bob_and_carol();
        assert_eq!(press(&mut state, KeyCode::Down), Some(Action::Select("bob".into())));
        for c in "hello".chars() {
            press(&mut state, KeyCode::Char(c));
        }
        shows(&screen(&state), "│hello ");
        let Some(Action::Send { to, body, token }) = press(&mut state, KeyCode::Enter) else { panic!("Enter did not send") };
        assert_eq!((to.as_str(), body.as_str()), ("bob", "hello"));
        let rows = screen(&state);
        shows(&rows, "│10:00:00 alice: hello … sending ");
        assert!(!rows.join("\n").contains("│hello"), "the input line is empty again");

        let stored = message("bob", "a1", "out", "hello", "delivered", "2026-01-01T10:00:01.000Z");
        state.apply_send_result(token, Ok(&stored), 0);
        let received = json!({ "type": "message", "event_id": 1, "message": message("bob", "b1", "in", "hi alice", "received", "2026-01-01T10:00:05.000Z") });
        assert_eq!(state.apply_event(&received, 0), None);

        let rows = screen(&state);
        shows(&rows, "│10:00:01 alice: hello ✓ ");
        assert!(!rows.join("\n").contains("sending"));
        shows(&rows, "│10:00:05 bob: hi alice ");
        assert!(row(&rows, "bob · online · verified").starts_with("┌ alice · contacts ┐"));
        shows(&rows, "│● bob ✔ ");
    }

    #[test]
    fn unread_counts_presence_notices_and_failures() {
        let mut state = alice_with_bob_and_carol();
        press(&mut state, KeyCode::Down);
        let from_carol =
            json!({ "type": "message", "message": message("carol", "c1", "in", "psst", "received", "2026-01-01T10:00:00.000Z") });
        state.apply_event(&from_carol, 0);
        state.apply_event(
            &json!({ "type": "message", "message": message("carol", "c2", "in", "hello?", "received", "2026-01-01T10:00:01.000Z") }),
            0,
        );
        let rows = screen(&state);
        shows(&rows, "│○ carol (2) ");
        assert!(!rows.join("\n").contains("psst"), "carol's messages are not in bob's conversation");

        state.apply_event(&json!({ "type": "presence", "peer": "carol", "online": true }), 1_767_261_601_000);
        let rows = screen(&state);
        assert!(rows[H as usize - 1].starts_with("10:00:01 carol is online"), "join notice: {:?}", rows[H as usize - 1]);
        shows(&rows, "│● carol (2) ");

        for c in "anyone".chars() {
            press(&mut state, KeyCode::Char(c));
        }
        let Some(Action::Send { token, .. }) = press(&mut state, KeyCode::Enter) else { panic!("no send") };
        let offline = crate::control::RpcError::new(crate::exit::ExitClass::Unreachable, "bob is not online");
        state.apply_send_result(token, Err(&offline), 0);
        let rows = screen(&state);
        shows(&rows, "│10:00:00 alice: anyone ✗ not delivered ");
        assert!(rows[H as usize - 1].starts_with("00:00:00 not delivered to bob: bob is not online"), "{}", rows.join("\n"));

        assert_eq!(press(&mut state, KeyCode::Tab), Some(Action::Select("carol".into())));
        let rows = screen(&state);
        shows(&rows, "│10:00:00 carol: psst ");
        assert!(!row(&rows, "● carol").contains("(2)"), "read once shown");
    }

    #[test]
    fn a_key_change_shows_a_loud_banner() {
        let mut state = alice_with_bob_and_carol();
        press(&mut state, KeyCode::Down);
        assert!(!screen(&state).join("\n").contains("KEY CHANGED"));
        let event = json!({ "type": "key_changed", "peer": "bob", "pinned": "11111 22222", "presented": "33333 44444" });
        state.apply_event(&event, 0);
        let rows = screen(&state);
        assert!(rows[0].starts_with("⚠ KEY CHANGED: bob presented an identity key"), "banner on top: {:?}", rows[0]);
        assert!(rows.iter().take(MAX_BANNER_ROWS).any(|r| r.contains("sotto contact verify bob")), "{}", rows.join("\n"));
        shows(&rows, "│  KEY CHANGED     │");
        shows(&rows, "bob · online · verified  KEY CHANGED ");
        assert!(rows[H as usize - 1].starts_with("00:00:00 WARNING: bob's identity key CHANGED; run sotto contact verify bob"));

        let mut mono = alice_with_bob_and_carol();
        mono.set_colour(false);
        mono.apply_event(&event, 0);
        let mut terminal = Terminal::new(TestBackend::new(W, H)).unwrap();
        terminal.draw(|frame| render(frame, &mono)).unwrap();
        let cell = &terminal.backend().buffer()[(0, 0)];
        assert_eq!((cell.fg, cell.bg), (Color::Reset, Color::Reset), "NO_COLOR: no colours");
        assert!(cell.modifier.contains(Modifier::REVERSED | Modifier::BOLD), "still loud");
    }

    #[test]
    fn peer_text_cannot_draw_on_the_screen() {
        let mut state = alice_with_bob_and_carol();
        press(&mut state, KeyCode::Down);
        let evil = message("bob", "e1", "in", "x\x1b[2J\u{202e}y\n10:00:00 alice: fake", "received", "2026-01-01T10:00:00.000Z");
        state.apply_event(&json!({ "type": "message", "message": evil }), 0);
        let rows = screen(&state);
        shows(&rows, r"│10:00:00 bob: x\u{1b}[2J\u{202e}y ");
        shows(&rows, "│             10:00:00 alice: fake ");
    }

    #[test]
    fn long_messages_wrap_under_the_time_and_scroll_to_the_newest() {
        let mut state = alice_with_bob_and_carol();
        press(&mut state, KeyCode::Down);
        let long = "lorem ipsum dolor sit amet ".repeat(6);
        let mut history = vec![message("bob", "l", "in", &long, "received", "2026-01-01T09:00:00.000Z")];
        for i in 0..30 {
            history.push(message(
                "bob",
                &format!("m{i}"),
                "in",
                &format!("number {i}"),
                "received",
                &format!("2026-01-01T10:00:{i:02}.000Z"),
            ));
        }
        state.apply_history("bob", &json!({ "messages": history }));
        let rows = screen(&state);
        assert!(rows[H as usize - 6].contains("│10:00:29 bob: number 29 "), "the newest is at the bottom");
        assert!(!rows.join("\n").contains("lorem"));

        for _ in 0..10 {
            press(&mut state, KeyCode::PageUp);
        }
        let rows = screen(&state);
        assert!(rows[1].ends_with("││09:00:00 bob: lorem ipsum dolor sit amet lorem ipsum      │"), "scrolled to the oldest: {rows:#?}");
        assert!(rows[2].ends_with("││         dolor sit amet lorem ipsum dolor sit amet lorem  │"), "wrapped under the time");
        shows(&rows, "10:00:09 bob: number 9 ");
        assert!(rows[H as usize - 5].contains("─ ↓ 20 newer (PgDn) ┘"));
        for _ in 0..10 {
            press(&mut state, KeyCode::PageDown);
        }
        shows(&screen(&state), "│10:00:29 bob: number 29 ");
        let wrapped = wrap(&[("aaa bbb ccc", Style::new())], 8, 2);
        let text: Vec<String> = wrapped.iter().map(|l| l.to_string()).collect();
        assert_eq!(text, ["aaa bbb ", "  ccc"]);
        let text: Vec<String> = wrap(&[("abcdefghij", Style::new())], 4, 0).iter().map(|l| l.to_string()).collect();
        assert_eq!(text, ["abcd", "efgh", "ij"]);
    }
}
