-- Seed of the arena_custom example: 200 parts over 3 sites. Run by the arena before each run.
drop table if exists public.parts cascade;
create table public.parts (
    part_id integer primary key,
    site    text    not null,
    name    text    not null unique,
    bin     text    not null,
    qty     integer not null,
    state   text    not null default 'active' check (state in ('active', 'retired'))
);
insert into public.parts
select g,
       (array['north', 'south', 'east'])[1 + g % 3],
       (array['Steel', 'Brass', 'Nylon', 'Copper'])[1 + g % 4] || ' ' ||
       (array['Bolt', 'Washer', 'Bracket', 'Hinge', 'Spring'])[1 + (g / 4) % 5] || ' ' || g,
       'B' || (g % 40),
       (g * 37) % 500,
       'active'
from generate_series(1, 200) g;
