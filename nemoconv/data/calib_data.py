"""The built-in calibration text for `nemoconv quantize` (used when no --calib-file is given).

Static FP8 scales are the largest activation seen during calibration, so the text should reach the
corners of the activation space a served model meets: prose, code, math, structured data, dialogue,
lists, several languages and scripts. Every paragraph here was written for nemoconv. It is small
(a few thousand tokens): `quantize` cycles through it in a seeded order to fill `--calib-samples`
sequences and says so; for a production checkpoint calibrate on real traffic with --calib-file.
"""

from __future__ import annotations

CALIBRATION_TEXTS: tuple[str, ...] = (
    # ---- prose -------------------------------------------------------------------------------------
    "The lighthouse keeper kept two logs. The official one recorded wind speed, visibility and the ships "
    "that passed; the other, a cheap notebook with a cracked spine, recorded everything else: the night a "
    "fox crossed the causeway at low tide, the week the fog never lifted, the letter from his sister that "
    "he read eleven times before answering.",
    "Cities that grew around rivers rarely chose the river for its beauty. Water meant transport, power "
    "for mills, a place to carry waste away and a line that armies found hard to cross. Only much later, "
    "once railways and pipes had taken over those jobs, did the embankments turn into promenades and the "
    "warehouses into flats with expensive views.",
    "In the spring of her third year at the observatory, Mireille noticed that one of the faint variable "
    "stars in her survey field brightened every 41.7 days, almost to the hour. Her supervisor suggested an "
    "instrument artefact. It took her four months, two borrowed telescopes and a great deal of stubbornness "
    "to show that it was a binary system with an eccentric orbit.",
    "Bread is a negotiation between flour, water, salt and time. Too little water and the crumb is tight "
    "and dry; too much and the loaf spreads into a pancake. Long, cold fermentation develops flavour because "
    "the yeast and bacteria work slowly, turning starches into sugars, acids and gas while the gluten "
    "network relaxes and stretches.",
    "The committee met on a Thursday, argued for three hours about the colour of the new signage, and "
    "adjourned without discussing the budget, the staffing shortfall or the leaking roof in the east wing. "
    "Everyone agreed afterwards that it had been a productive meeting.",
    # ---- code --------------------------------------------------------------------------------------
    "import heapq\n\ndef dijkstra(graph, source):\n    \"\"\"Shortest distances from source in a graph with "
    "non-negative edge weights.\"\"\"\n    dist = {source: 0}\n    queue = [(0, source)]\n    while queue:\n"
    "        d, node = heapq.heappop(queue)\n        if d > dist.get(node, float('inf')):\n            continue\n"
    "        for neighbour, weight in graph[node].items():\n            nd = d + weight\n"
    "            if nd < dist.get(neighbour, float('inf')):\n                dist[neighbour] = nd\n"
    "                heapq.heappush(queue, (nd, neighbour))\n    return dist\n",
    "#include <stdio.h>\n#include <stdlib.h>\n\ntypedef struct Node { int value; struct Node *next; } Node;\n\n"
    "static Node *reverse(Node *head) {\n    Node *prev = NULL;\n    while (head) {\n        Node *next = head->next;\n"
    "        head->next = prev;\n        prev = head;\n        head = next;\n    }\n    return prev;\n}\n\n"
    "int main(void) {\n    Node c = {3, NULL}, b = {2, &c}, a = {1, &b};\n"
    "    for (Node *n = reverse(&a); n; n = n->next) printf(\"%d \", n->value);\n    return EXIT_SUCCESS;\n}\n",
    "SELECT c.region,\n       COUNT(DISTINCT o.customer_id) AS buyers,\n       SUM(o.amount) AS revenue,\n"
    "       ROUND(SUM(o.amount) / NULLIF(COUNT(DISTINCT o.customer_id), 0), 2) AS revenue_per_buyer\n"
    "FROM orders o\nJOIN customers c ON c.id = o.customer_id\nWHERE o.created_at >= DATE '2024-01-01'\n"
    "GROUP BY c.region\nHAVING SUM(o.amount) > 10000\nORDER BY revenue DESC\nLIMIT 20;",
    "fn parse_pairs(input: &str) -> Result<Vec<(String, i64)>, String> {\n    input\n        .lines()\n"
    "        .filter(|l| !l.trim().is_empty())\n        .map(|line| {\n"
    "            let (k, v) = line.split_once('=').ok_or(format!(\"missing '=' in {line:?}\"))?;\n"
    "            let n = v.trim().parse::<i64>().map_err(|e| e.to_string())?;\n"
    "            Ok((k.trim().to_owned(), n))\n        })\n        .collect()\n}",
    "const debounce = (fn, ms = 250) => {\n  let timer;\n  return (...args) => {\n    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn.apply(this, args), ms);\n  };\n};\n\n"
    "document.querySelector('#search').addEventListener('input', debounce(async (event) => {\n"
    "  const res = await fetch(`/api/search?q=${encodeURIComponent(event.target.value)}`);\n"
    "  render(await res.json());\n}));",
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in logs/*.gz; do\n  count=$(zcat \"$f\" | grep -c ' 5[0-9][0-9] ' "
    "|| true)\n  printf '%-40s %6d\\n' \"$(basename \"$f\")\" \"$count\"\ndone | sort -k2 -nr | head -n 10",
    # ---- math and science --------------------------------------------------------------------------
    "Theorem. For every prime p and integer a not divisible by p, a^(p-1) ≡ 1 (mod p). Proof sketch: the "
    "numbers a, 2a, ..., (p-1)a are distinct and non-zero modulo p, so they are a permutation of 1, 2, ..., "
    "p-1. Multiplying them gives a^(p-1) (p-1)! ≡ (p-1)! (mod p), and (p-1)! is invertible modulo p.",
    "Let f(x) = x^3 - 6x^2 + 9x + 1. Then f'(x) = 3x^2 - 12x + 9 = 3(x - 1)(x - 3), so the critical points "
    "are x = 1 and x = 3. Since f''(x) = 6x - 12, we get f''(1) = -6 < 0 (a local maximum, f(1) = 5) and "
    "f''(3) = 6 > 0 (a local minimum, f(3) = 1).",
    "The integral of exp(-x^2) over the whole real line equals sqrt(pi). Squaring it and switching to polar "
    "coordinates turns the problem into the integral of r exp(-r^2) dr dθ over 0 ≤ r < ∞ and 0 ≤ θ < 2π, "
    "which is 2π · 1/2 = π. Hence ∫ e^{-x²} dx = √π ≈ 1.7724538509.",
    "A 0.250 mol sample of an ideal gas occupies 6.20 L at 298 K. Its pressure is P = nRT / V = "
    "(0.250 mol)(0.08206 L·atm/(mol·K))(298 K) / 6.20 L ≈ 0.986 atm. Doubling the temperature at constant "
    "volume doubles the pressure; halving the volume at constant temperature does the same.",
    "Matrix A = [[2, 1], [1, 3]] has characteristic polynomial λ² - 5λ + 5 = 0, so its eigenvalues are "
    "λ = (5 ± √5) / 2, approximately 3.618 and 1.382. Both are positive, so A is positive definite, and its "
    "determinant 5 equals their product while its trace 5 equals their sum.",
    # ---- structured data ---------------------------------------------------------------------------
    "{\"order_id\": \"A-20931\", \"status\": \"shipped\", \"items\": [{\"sku\": \"KB-104\", \"qty\": 2, "
    "\"unit_price\": 49.90}, {\"sku\": \"MS-221\", \"qty\": 1, \"unit_price\": 19.00}], \"shipping\": "
    "{\"carrier\": \"DHL\", \"tracking\": \"JD014600003128\", \"eta\": \"2025-03-14\"}, \"paid\": true, "
    "\"discount\": null}",
    "date,station,temp_min_c,temp_max_c,precip_mm,wind_kmh\n2024-11-01,Oslo,2.1,7.4,0.0,14\n"
    "2024-11-01,Bergen,5.8,9.9,18.2,31\n2024-11-02,Oslo,-0.6,5.2,1.4,9\n2024-11-02,Bergen,4.9,8.7,22.7,44\n"
    "2024-11-03,Oslo,-2.3,3.8,0.0,6\n2024-11-03,Bergen,3.1,7.6,9.5,27",
    "<table class=\"prices\">\n  <tr><th>Plan</th><th>Monthly</th><th>Storage</th></tr>\n"
    "  <tr><td>Starter</td><td>$4</td><td>20 GB</td></tr>\n"
    "  <tr><td>Team</td><td>$12</td><td>1 TB</td></tr>\n"
    "  <tr><td>Enterprise</td><td>contact us</td><td>unlimited</td></tr>\n</table>",
    "server:\n  host: 0.0.0.0\n  port: 8443\n  tls:\n    cert: /etc/ssl/certs/api.pem\n    key: /etc/ssl/private/api.key\n"
    "database:\n  url: postgres://app@db:5432/main\n  pool_size: 16\n  timeout_s: 5\nfeatures: [search, exports, "
    "audit-log]\n",
    "2025-02-17T08:14:03.512Z INFO  worker-3 job=reindex shard=12 docs=48213 took=2.41s\n"
    "2025-02-17T08:14:05.007Z WARN  worker-1 job=thumbnails retry=2 reason=\"timeout after 30s\" url=/img/9f3a\n"
    "2025-02-17T08:14:05.118Z ERROR api-gw status=502 upstream=billing latency_ms=30012 trace=7c1e0d22",
    # ---- dialogue ----------------------------------------------------------------------------------
    "User: My tomato plants have yellow leaves at the bottom but the top looks fine. Should I worry?\n"
    "Assistant: Yellowing that starts on the lowest leaves is usually either natural ageing or a nitrogen "
    "shortage. Remove the yellow leaves, check that the soil drains well, and feed with a balanced "
    "fertiliser. If brown spots with rings appear, that points to early blight instead.",
    "User: Write a haiku about debugging.\nAssistant: Print statement at dawn / the variable was null all "
    "along / coffee has gone cold\nUser: Now one about code review.\nAssistant: Forty comments deep / "
    "\"nit: trailing whitespace here\" / approved, finally",
    "Customer: Hi, I was charged twice for the same booking on March 3rd.\nAgent: I'm sorry about that. "
    "Could you give me the booking reference?\nCustomer: It's QX-77812.\nAgent: Thank you. I can see the "
    "duplicate payment; I've issued a refund of €128.40, which should reach your card within five working days.",
    "\"You're late,\" said the conductor without looking up.\n\"The bridge was closed,\" Tomas said.\n"
    "\"The bridge is always closed on Tuesdays.\"\n\"It's Wednesday.\"\nThe conductor finally raised his eyes, "
    "checked the calendar on the wall, and said nothing at all.",
    # ---- lists and instructions --------------------------------------------------------------------
    "Checklist before a long hike:\n1. Check the forecast and tell someone your route.\n2. Pack water (at "
    "least 2 L), food, a map and a charged phone.\n3. Bring layers: a warm fleece and a waterproof shell.\n"
    "4. Carry a small first-aid kit, a whistle and a headlamp.\n5. Turn back if the weather changes; the "
    "mountain will still be there next week.",
    "How to replace a bicycle inner tube:\n- Release the brake and remove the wheel.\n- Lever one side of "
    "the tyre off the rim and pull out the old tube.\n- Run your fingers inside the tyre to find thorns or "
    "glass.\n- Inflate the new tube slightly, fit it, and push the tyre back on by hand.\n- Inflate to the "
    "pressure printed on the sidewall.",
    "Release notes, version 3.2.0\n* New: export reports as CSV or Parquet.\n* Changed: the default "
    "timeout is now 60 s (was 30 s).\n* Fixed: dates before 1970 were shown one day early in some time "
    "zones.\n* Removed: the deprecated /v1/legacy endpoint.\n* Security: updated the TLS library to 3.0.13.",
    # ---- other languages and scripts ---------------------------------------------------------------
    "Die Energiewende verlangt mehr als neue Windräder und Solaranlagen. Stromnetze müssen ausgebaut, "
    "Speicher entwickelt und Gebäude besser gedämmt werden. Viele Gemeinden gründen deshalb Genossenschaften, "
    "in denen Bürgerinnen und Bürger gemeinsam in Anlagen investieren und von den Erträgen profitieren.",
    "Le marché couvert ouvre à sept heures. Les maraîchers installent leurs cageots de poireaux, de courges "
    "et de pommes, le fromager découpe une meule de comté, et l'odeur du pain chaud se mêle à celle du café. "
    "Vers midi, tout le monde parle en même temps et personne ne semble pressé.",
    "El río nace en la sierra, atraviesa tres provincias y desemboca en un delta lleno de aves migratorias. "
    "Durante siglos fue la principal vía de comercio de la región; hoy sus orillas se recorren en bicicleta "
    "y las antiguas aceñas se han convertido en pequeños museos.",
    "Наука о материалах изучает, как строение вещества определяет его свойства. Изменяя размер зёрен "
    "металла или добавляя небольшое количество углерода, можно сделать сталь одновременно прочнее и "
    "пластичнее. Такие эффекты объясняются движением дислокаций в кристаллической решётке.",
    "東京の朝の通勤電車はとても混雑しているが、驚くほど静かだ。多くの人はスマートフォンでニュースを読んだり、"
    "目を閉じて休んだりしている。駅に着くと、人の流れは整然と出口へ向かい、数分後にはホームがまた空になる。",
    "인공지능 모델을 평가할 때는 정확도만 보는 것이 아니라 응답 속도, 메모리 사용량, 그리고 다양한 언어와 주제에서의 "
    "일관성도 함께 확인해야 한다. 작은 차이가 실제 서비스에서는 큰 비용으로 이어질 수 있기 때문이다.",
    "الخط العربي فنّ له تاريخ طويل، وتطوّرت منه أنماط كثيرة مثل النسخ والثلث والديواني. ويعتمد جمال الخط "
    "على التوازن بين الحروف والمسافات، وعلى الإيقاع الذي تصنعه الكلمات عندما تتتابع في السطر.",
    "भारत में मानसून का आगमन किसानों के लिए बहुत महत्वपूर्ण होता है। समय पर अच्छी बारिश होने से धान, कपास और "
    "दालों की फसलें अच्छी होती हैं, जबकि देर से आने वाला मानसून पूरे साल की अर्थव्यवस्था को प्रभावित कर सकता है।",
    "Ο φιλόσοφος υποστήριζε ότι η γνώση ξεκινά από την απορία. Όποιος νομίζει ότι τα ξέρει όλα δεν ψάχνει "
    "τίποτα καινούργιο· όποιος παραδέχεται την άγνοιά του έχει ήδη κάνει το πρώτο βήμα προς την κατανόηση.",
    # ---- numbers and mixed symbols -----------------------------------------------------------------
    "Q3 summary: revenue 14.82M (+9.6% YoY), gross margin 61.3%, operating expenses 7.05M, net income "
    "1.94M. Cash at quarter end: 22.4M. Headcount 183 (+11). Churn fell from 2.9% to 2.1%; average contract "
    "value rose to 18,450 USD. Guidance for Q4: revenue between 15.3M and 15.9M.",
    "Flight LH 1234 FRA→LIS departs 06:55 from gate B44, arrives 09:05 local time (UTC+0). Seat 17C, "
    "baggage allowance 1 × 23 kg. Connection TP 1950 LIS→FNC at 11:20; minimum connecting time 60 min. "
    "Booking code 8KQ2ZM; e-ticket 220-4861937355.",
    "Regex cheat sheet: ^\\d{4}-\\d{2}-\\d{2}$ matches an ISO date; [A-Z]{2}\\d{2}[A-Z0-9]{1,30} roughly "
    "matches an IBAN; (?i)colou?r matches color or colour; \\b(\\w+)\\s+\\1\\b finds doubled words; "
    "(?<=\\$)\\d+(\\.\\d\\d)? captures a dollar amount without the sign.",
)
