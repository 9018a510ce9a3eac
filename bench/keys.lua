-- wrk script: every request carries one of 10,000 API keys, chosen at
-- random, in X-Api-Key (the same 10k keys in every wrk thread)
local keys = {}
for i = 1, 10000 do
    keys[i] = string.format("mk_bench_%05d_4f9c2a7e", i)
end

local path = os.getenv("BENCH_PATH") or "/getCreditScore"

init = function(args)
    math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

request = function()
    return wrk.format("GET", path, { ["X-Api-Key"] = keys[math.random(10000)] })
end

-- one machine-readable line for bench/run.py
done = function(summary, latency, requests)
    local secs = summary.duration / 1e6
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d rps=%.1f p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
        summary.requests, summary.requests / secs,
        latency:percentile(50), latency:percentile(99),
        e.connect + e.read + e.write + e.timeout, e.status))
end
