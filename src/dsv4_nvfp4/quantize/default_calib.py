"""The built-in calibration conversations: small, varied, written here (no download).

Why built in: ``quantize`` must run with no hub access, and a first run
should not need the user to find a data set. Twenty-four conversations cover
what a DeepSeek V4 deployment serves — chat, step-by-step maths, code,
reasoning traces (thinking mode), tool calls with DSML, JSON output,
multilingual text — so every routed expert is likely to see tokens. It is a
smoke-test-sized set (a few thousand tokens): for a production checkpoint pass
``--calib`` with a few hundred real conversations (see docs/quantize.md); the
expert-coverage check says when the data was too thin.
"""

from __future__ import annotations


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    """An OpenAI-style function tool whose parameters are one JSON-schema object."""
    return {"type": "function",
            "function": {"name": name, "description": description,
                         "parameters": {"type": "object", "properties": properties,
                                        "required": required}}}


_WEATHER_TOOL = _tool("get_weather", "Current weather for a city.",
                      {"city": {"type": "string"},
                       "unit": {"type": "string", "enum": ["C", "F"]}}, ["city"])
_SEARCH_TOOL = _tool("search_docs", "Full-text search over the product documentation.",
                     {"query": {"type": "string"}, "top_k": {"type": "integer"}}, ["query"])


def _qa(user: str, answer: str, reasoning: str | None = None,
        system: str | None = None) -> dict:
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": user})
    turn: dict = {"role": "assistant", "content": answer}
    if reasoning is not None:
        turn["reasoning"] = reasoning
    msgs.append(turn)
    return {"messages": msgs}


DEFAULT_CONVERSATIONS: tuple[dict, ...] = (
    _qa("What is the capital of Australia, and why is it not Sydney?",
        "The capital is Canberra. When the colonies federated in 1901, Sydney and Melbourne "
        "both wanted the title, so a compromise site between them was chosen and Canberra "
        "was built as a planned city; Parliament moved there in 1927."),
    _qa("A train leaves at 14:35 and arrives at 18:10. How long is the trip?",
        "3 hours and 35 minutes.",
        reasoning="From 14:35 to 17:35 is 3 hours. From 17:35 to 18:10 is 35 minutes. "
                  "Total 3 h 35 min."),
    _qa("Write a Python function that returns the n-th Fibonacci number iteratively.",
        "```python\ndef fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a\n```\nIt runs in O(n) time and O(1) memory."),
    _qa("Solve for x: 3x + 7 = 25.",
        "x = 6.",
        reasoning="Subtract 7 from both sides: 3x = 18. Divide by 3: x = 6. Check: "
                  "3*6 + 7 = 25. Correct."),
    _qa("Explique en deux phrases ce qu'est la photosynthèse.",
        "La photosynthèse est le processus par lequel les plantes, les algues et certaines "
        "bactéries transforment la lumière, l'eau et le dioxyde de carbone en glucose. "
        "Elle libère de l'oxygène comme sous-produit."),
    _qa("用三句话介绍一下长城。",
        "长城是中国古代修建的军事防御工程，绵延两万多公里。它始建于春秋战国时期，明朝时大规模重修。"
        "如今它是世界文化遗产，也是中华民族的象征之一。"),
    _qa("Summarise the difference between TCP and UDP for a beginner.",
        "TCP sets up a connection, numbers every byte, resends what gets lost and delivers "
        "data in order, so it is reliable but adds delay. UDP just sends independent "
        "datagrams with no handshake or retransmission: faster and lighter, but packets may "
        "be lost or arrive out of order. Web pages and e-mail use TCP; games, voice and "
        "video calls often use UDP."),
    _qa("Is 221 a prime number?",
        "No. 221 = 13 × 17.",
        reasoning="sqrt(221) is about 14.9, so test primes up to 13. 221 is odd, digit sum 5 "
                  "so not divisible by 3, does not end in 0 or 5, 7*31 = 217 and 7*32 = 224 "
                  "so not 7, 11*20 = 220 so not 11, 13*17 = 221. So 221 is composite."),
    _qa("Convert this JSON to YAML: {\"name\": \"vllm\", \"gpus\": 8, \"tp\": true}",
        "```yaml\nname: vllm\ngpus: 8\ntp: true\n```"),
    _qa("Give me a SQL query that returns the ten customers with the highest total order "
        "value from tables customers(id, name) and orders(customer_id, amount).",
        "```sql\nSELECT c.id, c.name, SUM(o.amount) AS total\nFROM customers c\n"
        "JOIN orders o ON o.customer_id = c.id\nGROUP BY c.id, c.name\n"
        "ORDER BY total DESC\nLIMIT 10;\n```"),
    _qa("Why does ice float on water?",
        "Ice is less dense than liquid water. When water freezes, hydrogen bonds lock the "
        "molecules into an open hexagonal lattice that takes about 9% more volume than the "
        "liquid, so by Archimedes' principle the ice floats with roughly 90% of it submerged.",
        system="You are a concise science tutor."),
    _qa("Translate to German: 'The meeting has been moved to Thursday afternoon.'",
        "Das Meeting wurde auf Donnerstagnachmittag verschoben."),
    _qa("What is the derivative of x^3 * sin(x)?",
        "3x^2 sin(x) + x^3 cos(x).",
        reasoning="Product rule: (f g)' = f' g + f g'. f = x^3, f' = 3x^2; g = sin x, "
                  "g' = cos x. So 3x^2 sin x + x^3 cos x."),
    _qa("Write a haiku about a GPU running out of memory.",
        "Tensors pile like snow\nthe allocator sighs once\nCUDA out of memory"),
    _qa("Explain what a mixture-of-experts layer is in one paragraph.",
        "A mixture-of-experts layer replaces one large feed-forward block with many smaller "
        "ones, the experts, and a router that scores them for every token. Each token is sent "
        "to only its top-k experts and their outputs are summed with the router weights, so "
        "the model holds far more parameters than it spends compute on for any single token."),
    _qa("Find the bug: for i in range(len(xs)): if xs[i] = 0: print(i)",
        "`=` is assignment; a comparison needs `==`. Write `if xs[i] == 0:` — or more "
        "idiomatically `for i, x in enumerate(xs): if x == 0: print(i)`."),
    _qa("How many seconds are there in a leap year?",
        "31,622,400 seconds.",
        reasoning="366 days * 24 hours = 8784 hours; * 3600 = 31,622,400."),
    _qa("¿Cuál es la diferencia entre 'ser' y 'estar'?",
        "'Ser' describe características permanentes o esenciales (soy ingeniero, la mesa es de "
        "madera), mientras que 'estar' expresa estados temporales o ubicación (estoy cansado, "
        "el libro está en la mesa)."),
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant.", "tools": [_WEATHER_TOOL]},
        {"role": "user", "content": "Do I need an umbrella in Paris today?"},
        {"role": "assistant", "content": "", "reasoning": "I should check the weather.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather",
                                      "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": "{\"city\": \"Paris\", \"temp\": 14, \"condition\": \"light rain\"}"},
        {"role": "assistant", "reasoning": "Light rain at 14 C: yes, take an umbrella.",
         "content": "Yes — it is 14 °C with light rain in Paris right now, so take an "
                    "umbrella."},
    ]},
    {"messages": [
        {"role": "system", "content": "Answer using the documentation tool.",
         "tools": [_SEARCH_TOOL]},
        {"role": "user", "content": "How do I enable expert parallelism?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_7", "type": "function",
                         "function": {"name": "search_docs",
                                      "arguments": {"query": "expert parallelism", "top_k": 3}}}]},
        {"role": "tool", "tool_call_id": "call_7",
         "content": "Pass --enable-expert-parallel together with --tensor-parallel-size N."},
        {"role": "assistant",
         "content": "Add `--enable-expert-parallel` to the serve command, together with "
                    "`--tensor-parallel-size` set to the number of GPUs."},
    ]},
    {"messages": [
        {"role": "user", "content": "Name three sorting algorithms."},
        {"role": "assistant", "content": "Quicksort, merge sort and heapsort."},
        {"role": "user", "content": "Which of them is stable?"},
        {"role": "assistant", "content": "Merge sort is stable; the usual in-place quicksort "
                                         "and heapsort are not."},
    ]},
    {"messages": [
        {"role": "system", "content": "Reply only with JSON.",
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": "person",
                                             "schema": {"type": "object",
                                                        "properties": {
                                                            "name": {"type": "string"},
                                                            "age": {"type": "integer"}}}}}},
        {"role": "user", "content": "Alice is 31 years old."},
        {"role": "assistant", "content": "{\"name\": \"Alice\", \"age\": 31}"},
    ]},
    _qa("Prove that the sum of two even integers is even.",
        "Let a = 2m and b = 2n for integers m and n. Then a + b = 2m + 2n = 2(m + n), and "
        "m + n is an integer, so a + b is even. ∎",
        reasoning="Even means divisible by 2, i.e. of the form 2k. Write both and factor."),
    _qa("List the planets of the solar system in order from the Sun.",
        "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune."),
)
