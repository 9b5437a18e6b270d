// node --test clients/js/
// Replays Broadcast messages recorded from the real worker (fixtures/, written by
// tests/generation/test_realtime_recording.py) through followChapter with a stand-in for
// the supabase-js client, adding duplicates, gaps, late joins and reconnects.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { codePointLength, followChapter, sliceCodePoints } from './chapter-stream.js'

const fixture = (name) =>
  JSON.parse(readFileSync(new URL(`./fixtures/${name}.json`, import.meta.url), 'utf8'))
const FIXTURES = ['plain', 'rescue']
const tick = () => new Promise((resolve) => setImmediate(resolve))

/** The database side: the chapter as of the first `position` recorded messages. */
function serverAt(messages, position) {
  let text = ''
  let status = 'queued'
  let progress = 0
  let step = null
  for (const { event, payload } of messages.slice(0, position)) {
    if (event === 'delta') {
      text = sliceCodePoints(text, 0, payload.offset) + payload.text
      progress = payload.progress
      step = payload.step ?? step
    } else if (event === 'rewind') {
      text = sliceCodePoints(text, 0, payload.length)
    } else if (event === 'status') {
      status = payload.status
      progress = payload.progress
      step = payload.step
    }
  }
  return { chapter_id: 'c', content: text, content_length: codePointLength(text), status,
    progress, current_step: step }
}

/** Enough of @supabase/supabase-js v2 for the client: channel, rpc, removeChannel, setAuth. */
class FakeSupabase {
  constructor(messages) {
    this.messages = messages
    this.position = 0 // how many messages the database has committed
    this.rpcCalls = []
    this.channels = []
    this.removed = []
    this.authSet = 0
    this.realtime = { setAuth: async () => { this.authSet++ } }
  }

  channel(name, opts) {
    const ch = {
      name,
      opts,
      handlers: [],
      subscriber: null,
      on(type, filter, callback) {
        this.handlers.push({ type, filter, callback })
        return this
      },
      subscribe(callback) {
        this.subscriber = callback
        return this
      },
    }
    this.channels.push(ch)
    return ch
  }

  async rpc(name, args) {
    this.rpcCalls.push({ name, args, position: this.position })
    await tick()
    return { data: [serverAt(this.messages, this.position)], error: null }
  }

  async removeChannel(ch) {
    this.removed.push(ch)
    return 'ok'
  }

  get ch() {
    return this.channels[0]
  }

  join(status = 'SUBSCRIBED') {
    this.ch.subscriber(status)
  }

  /** Realtime delivering one recorded realtime.messages row to this subscriber. */
  deliver(row) {
    for (const h of this.ch.handlers) {
      if (h.type === 'broadcast' && h.filter.event === row.event) {
        h.callback({ type: 'broadcast', event: row.event, payload: row.payload })
      }
    }
  }
}

async function start(messages, { position = 0 } = {}) {
  const supabase = new FakeSupabase(messages)
  supabase.position = position
  const seen = []
  const follow = followChapter(supabase, 'c', { onChange: (s) => seen.push(s), onError: (e) => { throw e } })
  await tick() // setAuth, then subscribe
  supabase.join()
  await follow.ready
  return { supabase, follow, seen }
}

/** Commit message i in the database, then (unless told not to) deliver it. */
async function play(supabase, messages, { skip = new Set(), repeat = new Map() } = {}) {
  for (let i = 0; i < messages.length; i++) {
    supabase.position = i + 1
    if (!skip.has(i)) supabase.deliver(messages[i])
    if (repeat.has(i)) supabase.deliver(messages[repeat.get(i)])
    await tick()
    await tick()
  }
}

function assertSameBytes(actual, expected) {
  assert.deepEqual(Buffer.from(actual, 'utf8'), Buffer.from(expected, 'utf8'))
}

for (const name of FIXTURES) {
  const { messages, final, chapter_id } = fixture(name)

  test(`${name}: recorded messages are what the database sent`, () => {
    assert.ok(messages.length > 5)
    for (const m of messages) {
      assert.equal(m.topic, `chapter:${chapter_id}`)
      assert.equal(m.private, true)
      assert.equal(m.extension, 'broadcast')
      assert.ok(['delta', 'rewind', 'status'].includes(m.event))
    }
    assert.equal(final.status, 'completed')
  })

  test(`${name}: joined before the first message, the text equals chapters.content`, async () => {
    const { supabase, follow } = await start(messages)
    assert.equal(supabase.ch.name, 'chapter:c')
    assert.deepEqual(supabase.ch.opts, { config: { private: true } })
    assert.equal(supabase.authSet, 1)
    await play(supabase, messages)
    assertSameBytes(follow.state.text, final.content)
    assert.equal(follow.state.length, codePointLength(final.content))
    assert.equal(follow.state.status, 'completed')
    assert.equal(follow.state.progress, 100)
    assert.ok(follow.finished)
    assert.equal(supabase.rpcCalls.length, 1) // no refetch was needed
    await follow.close()
    assert.deepEqual(supabase.removed, [supabase.ch])
  })

  test(`${name}: duplicates are dropped`, async () => {
    const deltas = messages.flatMap((m, i) => (m.event === 'delta' && m.payload.text ? [i] : []))
    const repeat = new Map()
    repeat.set(deltas[0], deltas[0]) // the same message twice in a row
    repeat.set(deltas[3], deltas[1]) // an old one, late
    repeat.set(deltas.at(-1), deltas.at(-2))
    const { supabase, follow } = await start(messages)
    await play(supabase, messages, { repeat })
    assertSameBytes(follow.state.text, final.content)
    assert.equal(supabase.rpcCalls.length, 1)
  })

  test(`${name}: a gap is repaired by refetching the text so far`, async () => {
    const deltas = messages.flatMap((m, i) => (m.event === 'delta' && m.payload.text ? [i] : []))
    const missing = deltas[2]
    const { supabase, follow, seen } = await start(messages)
    await play(supabase, messages, { skip: new Set([missing]) })
    assertSameBytes(follow.state.text, final.content)
    assert.equal(supabase.rpcCalls.length, 2) // the join, and the repair
    assert.ok(supabase.rpcCalls[1].position > missing) // it fetched past the missed delta
    // Nothing was ever shown out of order: every state's text is a prefix of a later one
    // or the result of a rewind.
    assert.ok(seen.every((s) => s.length === codePointLength(s.text)))
  })

  test(`${name}: joining mid-stream applies only what follows the loaded text`, async () => {
    const at = Math.floor(messages.length / 2)
    const { supabase, follow } = await start(messages, { position: at })
    assertSameBytes(follow.state.text, serverAt(messages, at).content)
    // Realtime may deliver messages committed just before the join: overlap by three.
    const rest = messages.slice(at - 3)
    for (let i = 0; i < rest.length; i++) {
      supabase.position = Math.min(messages.length, at + i + 1)
      supabase.deliver(rest[i])
      await tick()
      await tick()
    }
    assertSameBytes(follow.state.text, final.content)
  })

  test(`${name}: a reconnect refetches and carries on`, async () => {
    const half = Math.floor(messages.length / 2)
    const { supabase, follow } = await start(messages)
    await play(supabase, messages.slice(0, half))
    // The socket drops; two messages are committed meanwhile, then the channel re-joins.
    supabase.position = half + 2
    supabase.join('SUBSCRIBED')
    await tick()
    await tick()
    for (let i = half + 2; i < messages.length; i++) {
      supabase.position = i + 1
      supabase.deliver(messages[i])
      await tick()
    }
    assertSameBytes(follow.state.text, final.content)
    assert.equal(supabase.rpcCalls.length, 2)
  })
}

test('rescue: the rewind cuts the partial section before the new attempt resends it', async () => {
  const { messages, final } = fixture('rescue')
  const r = messages.findIndex((m) => m.event === 'rewind')
  assert.ok(r > 0)
  const { supabase, follow, seen } = await start(messages)
  await play(supabase, messages.slice(0, r))
  const before = follow.state.length
  supabase.position = r + 1
  supabase.deliver(messages[r])
  await tick()
  const { length } = messages[r].payload
  assert.ok(before > length)
  assert.equal(follow.state.length, length)
  assertSameBytes(follow.state.text, sliceCodePoints(final.content, 0, length))
  assert.ok(seen.some((s) => s.length === length))
})

test('offsets count code points, as PostgreSQL char_length does', () => {
  const s = 'a🌊bé'
  assert.equal(s.length, 5)
  assert.equal(codePointLength(s), 4)
  assert.equal(sliceCodePoints(s, 1), '🌊bé')
  assert.equal(sliceCodePoints(s, 2), 'bé')
  assert.equal(sliceCodePoints(s, 0, 2), 'a🌊')
  assert.equal(sliceCodePoints(s, 4), '')
  assert.equal(sliceCodePoints(s, 1, 1), '')
})

test('a delta that overlaps the end is applied from the end on', async () => {
  const messages = [
    { event: 'delta', payload: { offset: 0, text: 'ab🌊', progress: 20 } },
    { event: 'delta', payload: { offset: 3, text: 'cd', progress: 30 } },
  ]
  const { supabase, follow } = await start(messages)
  await play(supabase, messages)
  supabase.deliver({ event: 'delta', payload: { offset: 2, text: '🌊cdé', progress: 40 } })
  await tick()
  assert.equal(follow.state.text, 'ab🌊cdé')
  assert.equal(follow.state.length, 6)
  assert.equal(follow.state.progress, 40)
})

test('a refused join (not the owner) rejects ready and reports the error', async () => {
  const supabase = new FakeSupabase([])
  const errors = []
  const follow = followChapter(supabase, 'c', { onError: (e) => errors.push(e) })
  await tick()
  supabase.ch.subscriber('CHANNEL_ERROR', new Error('Unauthorized: You do not have permissions'))
  await assert.rejects(follow.ready, /Unauthorized/)
  assert.equal(errors.length, 1)
  assert.equal(supabase.rpcCalls.length, 0)
})

test('a regenerated chapter starts over from offset 0', async () => {
  const { messages, final } = fixture('plain')
  const { supabase, follow } = await start(messages)
  await play(supabase, messages)
  assertSameBytes(follow.state.text, final.content)
  // The user enqueues the chapter again: the database announces length 0, then new deltas.
  supabase.deliver({ event: 'status', payload: { status: 'queued', progress: 0, step: 'queued', length: 0 } })
  await tick()
  assert.equal(follow.state.text, '')
  assert.equal(follow.state.status, 'queued')
  supabase.deliver({ event: 'delta', payload: { offset: 0, text: 'A new start.', progress: 12 } })
  await tick()
  assert.equal(follow.state.text, 'A new start.')
  assert.equal(supabase.rpcCalls.length, 1)
})

