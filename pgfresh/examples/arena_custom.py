"""The change generator of the arena_custom example: `change(ctx)` makes one change.

The arena calls it at [arena] rate_per_s inside a transaction of its own. Use ctx.rng for every
choice (runs repeat from their seed), ctx.noisy to decide whether this change is noise, and
ctx.mark(kind, clean=...) to name the change; for a noisy value, `clean` holds the values the
row should have, which the arena takes as the true answer while the noise is in the row.
"""


def change(ctx):
    conn, rng = ctx.conn, ctx.rng
    (top,) = conn.execute("select max(part_id) from public.parts").fetchone()
    part = rng.randint(1, top)
    if ctx.noisy:  # a fat-finger quantity: ten times the real one
        row = conn.execute("select qty from public.parts where part_id = %s and state = 'active'", (part,)).fetchone()
        if row is None:
            return "noise:none"
        ctx.mark("noise:wrong_qty", clean={"qty": row[0]})
        conn.execute("update public.parts set qty = qty * 10 where part_id = %s", (part,))
        return "noise:wrong_qty"
    r = rng.random()
    if r < 0.8:
        ctx.mark("qty")
        conn.execute("update public.parts set qty = %s where part_id = %s", (rng.randint(0, 500), part))
        return "qty"
    if r < 0.9:
        ctx.mark("retire")
        conn.execute("update public.parts set state = 'retired' where part_id = %s", (part,))
        return "retire"
    ctx.mark("insert")
    conn.execute("insert into public.parts (part_id, site, name, bin, qty) values (%s, %s, %s, %s, %s)",
                 (top + 1, rng.choice(["north", "south", "east"]), f"Zinc Clamp {top + 1}", f"B{top % 40}",
                  rng.randint(0, 500)))
    return "insert"
