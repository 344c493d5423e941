// Geometry checks for the studio, run in the page by tests/e2e/test_browser_layout.py.
// Returns a list of problems, each a sentence naming the element; an empty list when the page fits.
({ phoneMaxWidth, skipWordsIn }) => {
  const problems = [];
  const shown = (el) => {
    const box = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    return box.width > 0 && box.height > 0 && style.visibility !== "hidden" && !el.closest(".visually-hidden");
  };
  const name = (el) => el.id ? `#${el.id}`
    : `${el.tagName.toLowerCase()}${[...el.classList].map((c) => "." + c).join("")}`;
  const px = (value) => `${Math.round(value)} px`;
  const formControl = (el) => ["INPUT", "SELECT", "OPTION", "TEXTAREA"].includes(el.tagName);
  const all = [...document.body.querySelectorAll("*")].filter((el) => !el.closest("dialog, template") && shown(el));
  const showing = new Set(all);
  const root = document.documentElement;

  // 1. Nothing scrolls sideways: not the page, not a panel, not any box inside one.
  if (root.scrollWidth > root.clientWidth) {
    problems.push(`the page scrolls sideways (${px(root.scrollWidth)} > ${px(root.clientWidth)})`);
  }
  for (const el of all) {
    if (formControl(el)) continue;
    const style = getComputedStyle(el);
    const clips = ["auto", "scroll", "hidden", "clip"].includes(style.overflowX);
    if (clips && style.textOverflow !== "ellipsis" && el.scrollWidth > el.clientWidth + 1) {
      problems.push(`${name(el)} overflows sideways (${px(el.scrollWidth)} > ${px(el.clientWidth)}, ` +
                    `overflow-x ${style.overflowX})`);
    }
  }

  // 2. No element is wider than its panel or sticks out of it.
  for (const panel of document.querySelectorAll(".panel")) {
    if (!showing.has(panel)) continue;
    const edge = panel.getBoundingClientRect();
    for (const el of panel.querySelectorAll("*")) {
      if (!showing.has(el) || el.tagName === "OPTION") continue;
      const box = el.getBoundingClientRect();
      if (box.width > panel.clientWidth + 1 || box.left < edge.left - 1 || box.right > edge.right + 1) {
        problems.push(`${name(el)} (${px(box.left)}..${px(box.right)}) leaves ${name(panel)} ` +
                      `(${px(edge.left)}..${px(edge.right)})`);
      }
    }
  }

  // 3. Nothing cuts its content off vertically unless it scrolls (then all of it can be reached).
  for (const el of all) {
    if (formControl(el)) continue;
    if (["hidden", "clip"].includes(getComputedStyle(el).overflowY) && el.scrollHeight > el.clientHeight + 1) {
      problems.push(`${name(el)} cuts its content off (${px(el.scrollHeight)} > ${px(el.clientHeight)} tall, ` +
                    "not scrollable)");
    }
  }

  // 4. No band of bare page below the columns: at the bottom of the document every point is on a panel,
  //    a column or the conversation, not on the page's or the workspace's background.
  window.scrollTo(0, root.scrollHeight);
  const bottom = window.innerHeight - 2;
  for (let i = 0; i <= 20; i += 1) {
    const x = Math.min(root.clientWidth - 2, Math.max(1, (root.clientWidth * i) / 20));
    const hit = document.elementFromPoint(x, bottom);
    if (!hit || !hit.closest(".panel, .column, .chat, .history, .composer")) {
      problems.push(`bare page at the bottom (x = ${px(x)}): ${hit ? name(hit) : "nothing"}`);
    }
  }
  window.scrollTo(0, 0);
  if (window.innerWidth > phoneMaxWidth) {
    // On a desktop the columns scroll and the page does not; every column (each box the workspace lays out)
    // reaches the bottom of the window.
    if (root.scrollHeight > window.innerHeight + 1) {
      problems.push(`the page scrolls (${px(root.scrollHeight)} > ${px(window.innerHeight)})`);
    }
    const laidOut = (el) => [...el.children].flatMap(
      (child) => getComputedStyle(child).display === "contents" ? laidOut(child) : [child]);
    for (const column of laidOut(document.querySelector(".workspace"))) {
      const box = column.getBoundingClientRect();
      if (Math.abs(box.bottom - window.innerHeight) > 2) {
        problems.push(`${name(column)} ends at ${px(box.bottom)}, the window at ${px(window.innerHeight)}`);
      }
    }
  }

  // 5. Text never breaks inside a word: no element asks for it, and where a line ends inside a text node,
  //    whitespace (or a hyphen, slash or dash) separates the last character of one line from the first of the next.
  for (const el of all) {
    if (getComputedStyle(el).wordBreak === "break-all") problems.push(`${name(el)} has word-break: break-all`);
  }
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!showing.has(parent) || formControl(parent) || (skipWordsIn && parent.closest(skipWordsIn))) continue;
    const text = node.data;
    let previous = null;
    let spaced = false;
    for (let i = 0; i < text.length; i += 1) {
      if (/\s/.test(text[i])) {
        spaced = true;
        continue;
      }
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      const box = range.getClientRects()[0];
      if (!box) continue;
      if (previous && box.top >= previous.bottom - 1 && !spaced && !/[-/\u2013\u2014]/.test(previous.ch)) {
        problems.push(`${name(parent)} breaks a word: "${text.slice(Math.max(0, i - 12), i)} / ${text.slice(i, i + 12)}"`);
      }
      previous = { ch: text[i], bottom: box.bottom };
      spaced = false;
    }
  }
  return problems;
}
