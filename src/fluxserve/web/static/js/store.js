// What the page remembers: the API base (localStorage) and API keys per API base
// (sessionStorage by default, localStorage only when the user asks to remember the key).

const PREFIX = "fluxserve.studio.";

function storage(name) {
  try {
    const store = window[name];
    const probe = PREFIX + "probe";
    store.setItem(probe, "1");
    store.removeItem(probe);
    return store;
  } catch {
    return null; // private mode or storage disabled: remember nothing
  }
}

const local = storage("localStorage");
const session = storage("sessionStorage");

function read(store, key, fallback) {
  if (!store) return fallback;
  try {
    const raw = store.getItem(PREFIX + key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function write(store, key, value) {
  if (!store) return;
  try {
    if (value === undefined || value === null) store.removeItem(PREFIX + key);
    else store.setItem(PREFIX + key, JSON.stringify(value));
  } catch {
    // quota or disabled storage: not worth bothering the user
  }
}

export function getApiBase() {
  return read(local, "apiBase", "");
}

export function setApiBase(base) {
  write(local, "apiBase", base || null);
}

function keyName(base) {
  return "apiKey:" + (base || "same-origin");
}

/** The key for an API base, and whether it is remembered across sessions. */
export function getApiKey(base) {
  const remembered = read(local, keyName(base), null);
  if (remembered) return { key: remembered, remember: true };
  return { key: read(session, keyName(base), ""), remember: false };
}

export function setApiKey(base, key, remember) {
  write(local, keyName(base), remember && key ? key : null);
  write(session, keyName(base), !remember && key ? key : null);
}

export function getPreference(name, fallback) {
  return read(local, "pref:" + name, fallback);
}

export function setPreference(name, value) {
  write(local, "pref:" + name, value);
}
