-- wrk script of bench/cost.py: every request carries one of BENCH_KEYS API
-- keys, chosen at random per request, in X-Api-Key.  The key list is
-- deterministic (cost.py registers the same keys in mtr:gov), and so is the
-- sequence: thread t of a run seeded BENCH_SEED draws from seed*1000+t.
local n = tonumber(os.getenv("BENCH_KEYS") or "10000")
local seed = tonumber(os.getenv("BENCH_SEED") or "1")
local path = os.getenv("BENCH_PATH") or "/api"

local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

init = function(args)
    math.randomseed(seed * 1000 + (tid or 0))
end

-- the key is formatted per request: a table of 1M strings made LuaJIT's
-- collector pause wrk for tens of ms (plain nginx's p99 went to 110 ms)
request = function()
    return wrk.format("GET", path, { ["X-Api-Key"] = string.format(
        "mk_cost_%07d_4f9c2a7e", math.random(n)) })
end

-- paced runs: each connection waits BENCH_DELAY_MS after each response
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if pause > 0 then
    delay = function()
        return pause
    end
end

-- one machine-readable line for bench/cost.py
done = function(summary, latency, requests)
    local secs = summary.duration / 1e6
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d secs=%.3f rps=%.1f p50_us=%d p99_us=%d "
        .. "max_us=%d errors=%d non2xx=%d\n",
        summary.requests, secs, summary.requests / secs,
        latency:percentile(50), latency:percentile(99), latency.max,
        e.connect + e.read + e.write + e.timeout, e.status))
end
