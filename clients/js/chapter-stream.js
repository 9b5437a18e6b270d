// Follow one chapter as genworker writes it: Broadcast deltas on the private topic
// `chapter:<id>`, reassembled by character offset. No dependencies: pass in the app's
// @supabase/supabase-js v2 client (signed in as the chapter's owner).
//
//   import { followChapter } from './chapter-stream.js'
//   const follow = followChapter(supabase, chapterId, { onChange: (s) => render(s) })
//   await follow.ready            // the text so far is loaded and the channel is joined
//   ...
//   await follow.close()
//
// Messages (see README "Watching a chapter"): 'delta' {offset, text, progress, step?},
// 'rewind' {length}, 'status' {status, progress, step, length, error_message?}. Offsets
// and lengths count characters (Unicode code points), as PostgreSQL's char_length does.
// A delta that is already applied is dropped; one past the end (a message was missed, or
// the channel reconnected) makes the client refetch the text so far with the RPC
// get_chapter_text, and apply only what comes after it.

/** Number of code points in a string (a JS string's length counts UTF-16 units). */
export function codePointLength(s) {
  let n = 0
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1)
      if (d >= 0xdc00 && d <= 0xdfff) i++
    }
    n++
  }
  return n
}

/** The part of `s` from code point `start` on (to `end`, if given). */
export function sliceCodePoints(s, start, end = Infinity) {
  let cp = 0
  let from = s.length
  let to = s.length
  for (let i = 0; i <= s.length; i++) {
    if (cp === start && from === s.length) from = i
    if (cp === end) {
      to = i
      break
    }
    if (i === s.length) break
    const c = s.charCodeAt(i)
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1)
      if (d >= 0xdc00 && d <= 0xdfff) i++
    }
    cp++
  }
  return from >= to ? '' : s.slice(from, to)
}

const FINAL = new Set(['completed', 'failed', 'cancelled'])

/**
 * Join `chapter:<chapterId>` and keep `state` ({text, length, status, progress, step,
 * errorMessage}) equal to the chapter as the database has it.
 * @param {object} supabase a @supabase/supabase-js v2 client
 * @param {string} chapterId
 * @param {{onChange?: (state: object) => void, onError?: (error: unknown) => void}} [options]
 */
export function followChapter(supabase, chapterId, options = {}) {
  const onChange = options.onChange ?? (() => {})
  const onError = options.onError ?? (() => {})
  const state = {
    text: '',
    length: 0,
    status: null,
    progress: 0,
    step: null,
    errorMessage: null,
  }
  let loaded = false // the text so far has been fetched at least once
  let fetching = null // the refetch in flight, if any
  let pending = [] // messages that arrived while (re)fetching
  let closed = false
  let resolveReady
  let rejectReady
  const ready = new Promise((resolve, reject) => {
    resolveReady = resolve
    rejectReady = reject
  })

  function changed() {
    if (!closed) onChange({ ...state })
  }

  /** Fetch the text so far, then replay what arrived meanwhile. One at a time. */
  function refetch() {
    if (fetching) return fetching
    fetching = (async () => {
      const { data, error } = await supabase.rpc('get_chapter_text', { p_chapter_id: chapterId })
      if (error) throw error
      const row = Array.isArray(data) ? data[0] : data
      if (!row) throw new Error(`chapter ${chapterId} not found (or not yours)`)
      state.text = row.content ?? ''
      state.length = codePointLength(state.text)
      state.status = row.status
      state.progress = Math.max(state.progress, row.progress ?? 0)
      state.step = row.current_step ?? state.step
      loaded = true
    })()
      .then(() => {
        fetching = null
        const queued = pending
        pending = []
        changed()
        for (const m of queued) apply(m.event, m.payload)
      })
      .catch((error) => {
        fetching = null
        onError(error)
      })
    return fetching
  }

  function apply(event, payload) {
    if (closed || !payload) return
    if (fetching || !loaded) {
      pending.push({ event, payload })
      return
    }
    if (event === 'delta') {
      const offset = payload.offset
      const text = payload.text ?? ''
      const end = offset + codePointLength(text)
      if (offset > state.length) {
        pending.push({ event, payload }) // a gap: fetch what we missed, then this
        refetch()
        return
      }
      if (end > state.length) {
        state.text += sliceCodePoints(text, state.length - offset)
        state.length = end
      } else if (text !== '') {
        return // already have it (a duplicate, or included in a refetch)
      }
      if (typeof payload.progress === 'number') {
        state.progress = Math.max(state.progress, payload.progress)
      }
      if (payload.step) state.step = payload.step
      state.status = 'generating'
      changed()
    } else if (event === 'rewind') {
      if (payload.length > state.length) {
        refetch() // we are behind even the rewound text
        return
      }
      if (payload.length < state.length) {
        state.text = sliceCodePoints(state.text, 0, payload.length)
        state.length = payload.length
        changed()
      }
    } else if (event === 'status') {
      state.status = payload.status ?? state.status
      if (typeof payload.progress === 'number') {
        // A new attempt may restart lower; a status event states the value outright.
        state.progress = payload.progress
      }
      state.step = payload.step ?? state.step
      state.errorMessage = payload.error_message ?? null
      if (typeof payload.length === 'number' && payload.length !== state.length) {
        if (payload.length < state.length) {
          state.text = sliceCodePoints(state.text, 0, payload.length)
          state.length = payload.length
        } else {
          refetch() // the final (or restarted) text is longer than ours: fetch it
          return
        }
      }
      changed()
    }
  }

  const channel = supabase.channel(`chapter:${chapterId}`, { config: { private: true } })
  for (const event of ['delta', 'rewind', 'status']) {
    channel.on('broadcast', { event }, (message) => apply(event, message.payload))
  }

  ;(async () => {
    try {
      // Realtime Authorization needs the user's JWT on the socket before a private join.
      if (supabase.realtime && typeof supabase.realtime.setAuth === 'function') {
        await supabase.realtime.setAuth()
      }
    } catch (error) {
      onError(error)
    }
    channel.subscribe((status, error) => {
      if (status === 'SUBSCRIBED') {
        // Joined (or re-joined after a reconnect, when messages may have been missed):
        // load the text so far; messages arriving meanwhile wait in `pending`.
        refetch().then(() => {
          if (loaded) resolveReady({ ...state })
        })
      } else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') {
        const e = error ?? new Error(`chapter channel: ${status}`)
        onError(e)
        if (!loaded) rejectReady(e)
      }
    })
  })()

  return {
    state,
    ready,
    /** True once the chapter reached a final status (completed, failed, cancelled). */
    get finished() {
      return FINAL.has(state.status)
    },
    /** Fetch the text so far now (for example when the tab becomes visible again). */
    refresh: () => refetch(),
    async close() {
      closed = true
      await supabase.removeChannel(channel)
    },
  }
}
