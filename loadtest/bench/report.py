"""The report on stdout: the runs table, CPU per answer, each scenario's section, and the targets.

``targets`` turns the issue's targets into met/MISSED entries (kept in the JSON; they never change the
exit code); ``print_table`` prints everything the JSON holds that a reader compares by eye.
"""

from __future__ import annotations

from typing import Any

from loadtest.bench.ingest_report import ingest_targets, print_ingest
from loadtest.bench.wal import print_wal


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets (2 cores, 2 workers, 4 analyzers): reported as met/missed, never hidden."""
    out: dict[str, Any] = {}
    baseline = report.get("baseline") or {}
    comparison = baseline.get("comparison", {})
    sinks = baseline.get("sinks", report.get("sinks"))
    if "distributor_over_nginx" in comparison:
        ratio = comparison["distributor_over_nginx"]
        out[f"2xx_per_s_vs_nginx_proxy_{sinks}_sinks_ge_1.2x"] = {
            "value": ratio["min"], "max": ratio["max"], "met": ratio["min"] >= 1.2, "judged_on": "least flattering round"}
        out[f"2xx_per_s_vs_nginx_proxy_{sinks}_sinks_ge_1.0x_must"] = {
            "value": ratio["min"], "max": ratio["max"], "met": ratio["min"] >= 1.0, "judged_on": "least flattering round"}
    if "distributor_over_floor" in comparison:
        ratio = comparison["distributor_over_floor"]
        out["2xx_per_s_vs_bare_floor_ge_0.7x"] = {"value": ratio["min"], "max": ratio["max"],
                                                  "met": ratio["min"] >= 0.7, "judged_on": "least flattering round"}
    skewed = baseline.get("pairs", {}).get("skewed")
    if skewed and skewed["distributor_split_error_points"] is not None:
        split = skewed["distributor_split_error_points"]
        out["split_error_skewed_le_0.5_points"] = {"value": split, "met": split <= 0.5}
    half = next((r for r in report["runs"] if r["scenario"] == "latency@50%"), None)
    floor = (report.get("latency_floor") or {}).get("latency_ms") or {}
    if half:
        p99 = half["latency_ms"]["p99"]
        out["p99_at_50pct_le_2ms"] = {"value": p99, "met": p99 <= 2.0,
                                      "service_p99": (half.get("service_ms") or {}).get("p99"),
                                      "handler_p99_le_ms": half.get("handler_p99_le_ms"),
                                      "generator_floor_p99": floor.get("p99")}
        if floor.get("p99") is not None:
            excess = p99 - floor["p99"]
            service = (half.get("service_ms") or {}).get("p99")
            floor_service = ((report.get("latency_floor") or {}).get("service_ms") or {}).get("p99")
            out["p99_at_50pct_minus_generator_floor_le_1ms"] = {
                "value": excess, "met": excess <= 1.0, "p99": p99, "generator_floor_p99": floor["p99"],
                "service_p99_minus_floor_service_p99": (None if service is None or floor_service is None
                                                        else service - floor_service),
                "generator_kept_schedule": (half.get("achieved_offered_rate") or 0) >= 0.95 * half["offered_rate"]}
    stress = report.get("stress_cpu") or {}
    if "p99_met" in stress:
        p99 = stress["latency_all_answers_ms"]["p99"]
        out["stress_cpu_p99_all_answers_lt_50ms"] = {"value": p99, "met": stress["p99_met"]}
        n503, with_ra = stress["status_503"], stress["status_503_with_retry_after"] or 0
        out["stress_cpu_503s_with_retry_after"] = {"value": float(n503), "with_retry_after": with_ra,
                                                   "met": n503 > 0 and with_ra == n503}
        out["stress_cpu_rss_le_queued_plus_60mb"] = {
            "value": max(stress["peak_rss_mb"].values(), default=0.0), "met": stress["rss_within_bound"]}
    if "memory" in report:
        worst = max((p["rss_mb"] for p in report["memory"]["workers"].values()), default=0.0)
        out["rss_queues_full_le_queue_bytes_plus_60mb"] = {"value": worst, "bound": report["memory"]["bound_mb"],
                                                            "met": report["memory"]["within_bound"]}
    out.update(ingest_targets(report.get("ingest") or {}))
    for mode, entry in ((report.get("wal") or {}).get("modes") or {}).items():
        if "target_over_off" in entry and entry["over_off"]:
            out[f"wal_{mode}_2xx_per_s_ge_{entry['target_over_off']}x_off"] = {
                "value": entry["over_off"]["min"], "max": entry["over_off"]["max"],
                "met": entry["target_met_every_round"], "judged_on": "least flattering round"}
    return out


def fmt_load(la: dict[str, list[float]] | None) -> str:
    if not la:
        return ""
    return f"{la['start'][0]:.2f}>{la['end'][0]:.2f}"


def fmt_mb(values: dict[str, float]) -> str:
    return "{" + ", ".join(f"w{k}: {v:.1f}" for k, v in sorted(values.items())) + "}"


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\ngenerator: {report['generator']}   machine: {m['cores']} cores, {m['cpu']}   workers: "
          f"{report['workers']}   sinks: {report['sinks']}   commit: {(report['git']['commit'] or '?')[:10]}"
          + (f" + {len(report['git']['modified_files'])} modified files" if report["git"]["modified_files"] else ""))
    print(f"loadavg at start {report['loadavg_start']}  at end {report.get('loadavg_end')}")
    print_runs(report)
    print_cpu(report)
    print_latency_floor(report)
    print_baseline(report)
    print_stress_cpu(report)
    if "memory" in report:
        memory = report["memory"]
        for slot, f in sorted(memory["workers"].items()):
            print(f"memory worker {slot}: queues {f['queued_mb']:.0f} MiB -> peak RSS {f['rss_mb']:.0f} MiB, "
                  f"USS {f['uss_mb']:.0f} MiB (bound {memory['bound_mb']:.0f} MiB)")
    print_ingest(report.get("ingest"))
    print_wal(report.get("wal"))
    print()
    for name, t in report["targets"].items():
        more = f" (most flattering {t['max']:.2f})" if "max" in t else ""
        print(f"target {name}: {t['value']:.2f}{more} -> {'met' if t['met'] else 'MISSED'}")
    print(f"check: {'PASSED' if report['check']['passed'] else 'FAILED'}"
          + (f" (failed runs: {', '.join(report['check']['failed_runs'])})" if report["check"]["failed_runs"] else ""))


def print_runs(report: dict[str, Any]) -> None:
    print(f"{'#':>3} {'scenario':<15}{'target':<12}{'sizes':<7}{'rnd':>3}{'2xx/s':>9}{'msgs/s':>10}{'503':>7}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'p99.9':>8}{'split':>7}{'uncnt':>7}{'load1':>12}  check")
    for r in report["runs"]:
        c, lat = r["check"], r["latency_ms"]
        split = c.get("split_error_points")
        print(f"{r['run']:>3} {r['scenario']:<15}{r['target']:<12}{r['sizes']:<7}{r['round'] or '':>3}"
              f"{r['packets_per_s']:>9.0f}{r['messages_per_s']:>10.0f}{r['ratio_503']:>7.1%}{lat.get('p50', 0):>8.2f}"
              f"{lat.get('p99', 0):>8.2f}{lat.get('p99.9', 0):>8.2f}{'-' if split is None else f'{split:.2f}':>7}"
              f"{c.get('uncounted_by_client', '-'):>7}{fmt_load(r['loadavg']):>12}  {'ok' if c['passed'] else 'FAILED'}")
        if r.get("service_ms") and r.get("offered_rate") and r["scenario"].startswith("latency"):
            sv = r["service_ms"]
            print(f"{'':<19}service time (from the write, no generator timer lag): p50 {sv['p50']:.2f} ms  "
                  f"p99 {sv['p99']:.2f} ms  p99.9 {sv['p99.9']:.2f} ms; handler p99 <= {r.get('handler_p99_le_ms')} ms")
        if r.get("achieved_offered_rate"):
            short = r["achieved_offered_rate"] < 0.9 * r["offered_rate"]
            print(f"{'':<19}offered {r['offered_rate']:.0f}/s, generator reached {r['achieved_offered_rate']:.0f}/s"
                  + (" (generator-bound: latency from schedule is the generator's backlog; see service time)"
                     if short else ""))
        if r.get("latency_503_ms"):
            l5 = r["latency_503_ms"]
            print(f"{'':<19}503 answers (probe): p50 {l5['p50']:.2f} ms  p99 {l5['p99']:.2f} ms  "
                  f"max {l5['max']:.2f} ms; peak RSS MiB {r['peak_rss_mb']} (bound {r['rss_bound_mb']:.0f})")


def print_cpu(report: dict[str, Any]) -> None:
    print("\nCPU per 2xx answer (µs; sut = the system's own processes; sinks = the analyzers; generator = wrk or "
          "the emitter; other = the rest of the machine, e.g. other engineers' tests)")
    print(f"{'#':>3} {'scenario':<15}{'target':<12}{'sut':>8}{'sinks':>8}{'gen':>8}{'machine':>9}"
          f"{'cores busy':>11}{'sut cores':>10}{'gen cores':>10}{'other s':>9}{'steal s':>9}")
    for r in report["runs"]:
        per, cpu = r["cpu_us_per_2xx"], r["cpu"]
        wall = max(cpu["wall_s"], 1e-9)
        gen_s = cpu["generator_s"] + (cpu["harness_s"] if r["generator"] == "emitter" else 0.0)

        def us(key: str) -> str:
            value = per.get(key)
            return "-" if value is None else f"{value:.1f}"

        print(f"{r['run']:>3} {r['scenario']:<15}{r['target']:<12}{us('sut'):>8}{us('sinks'):>8}{us('generator'):>8}"
              f"{us('machine'):>9}{cpu['machine_busy_fraction'] * (report['machine']['cores'] or 1):>11.2f}"
              f"{cpu['groups_s'].get('sut', 0.0) / wall:>10.2f}{gen_s / wall:>10.2f}{cpu['other_s']:>9.2f}"
              f"{cpu['machine_steal_s']:>9.2f}")


def print_latency_floor(report: dict[str, Any]) -> None:
    floor = report.get("latency_floor") or {}
    half = next((r for r in report["runs"] if r["scenario"] == "latency@50%"), None)
    if half and floor.get("latency_ms"):
        fl, fs, hs = floor["latency_ms"], floor["service_ms"], half.get("service_ms") or {}
        excess = half["latency_ms"]["p99"] - fl["p99"]
        print(f"\nlatency at 50% (open loop, {half['offered_rate']:.0f}/s), same run:")
        print(f"  {'':<34}{'p50 ms':>9}{'p99 ms':>9}{'p99.9':>9}{'service p99':>13}{'reached/s':>11}{'load1':>13}")
        for label, lat, sv, reached, la in (
                ("distributor", half["latency_ms"], hs, half.get("achieved_offered_rate"), half["loadavg"]),
                ("generator floor (nginx stub, 202)", fl, fs, floor.get("achieved_offered_rate"), floor["loadavg"])):
            print(f"  {label:<34}{lat['p50']:>9.2f}{lat['p99']:>9.2f}{lat['p99.9']:>9.2f}{sv.get('p99', 0):>13.2f}"
                  f"{reached or 0:>11.0f}{fmt_load(la):>13}")
        print(f"  p99 at 50% minus the generator floor's p99: {excess:+.2f} ms (target <= 1 ms: "
              f"{'met' if excess <= 1.0 else 'MISSED'}); the same from the write (service time): "
              f"{hs.get('p99', 0) - fs['p99']:+.2f} ms")
    elif floor.get("skipped"):
        print(f"\ngenerator floor skipped: {floor['skipped']}")


def print_baseline(report: dict[str, Any]) -> None:
    baseline = report.get("baseline") or {}
    if baseline.get("rounds"):
        print(f"\nsame run, alternating rounds (wrk closed loop, {report['config']['connections']} connections, "
              f"fixed packets; sinks: {baseline['sinks']}; CPU µs per 2xx of the system's own processes, "
              f"+ sinks in brackets)")
        print(f"{'round':>5}{'distributor':>13}{'nginx proxy':>13}{'bare floor':>12}{'d/nginx':>9}{'d/floor':>9}"
              f"{'µs dist':>14}{'µs nginx':>15}{'µs floor':>10}{'load1':>13}")
        for row in baseline["rounds"]:
            d, n, f = row["distributor"], row.get("nginx"), row["floor"]

            def cpu_cell(x: dict[str, Any] | None) -> str:
                if x is None:
                    return "-"
                own = x["cpu_us_per_2xx"] or 0.0
                sinks = x.get("sinks_cpu_us_per_2xx")
                return f"{own:.1f}" + (f" (+{sinks:.1f})" if sinks is not None else "")

            print(f"{row['round']:>5}{d['packets_per_s']:>13.0f}{(n['packets_per_s'] if n else 0):>13.0f}"
                  f"{f['packets_per_s']:>12.0f}"
                  f"{(d['packets_per_s'] / n['packets_per_s'] if n and n['packets_per_s'] else 0):>9.2f}"
                  f"{d['packets_per_s'] / max(f['packets_per_s'], 1e-9):>9.2f}"
                  f"{cpu_cell(d):>14}{cpu_cell(n):>15}{cpu_cell(f):>10}{fmt_load(row['loadavg']):>13}")
        for key, label in (("distributor_over_nginx", "distributor / nginx proxy"),
                           ("distributor_over_floor", "distributor / bare floor"),
                           ("cpu_per_2xx_nginx_over_distributor", "CPU/2xx nginx / distributor (>1: distributor "
                                                                  "cheaper)"),
                           ("cpu_per_2xx_floor_over_distributor", "CPU/2xx floor / distributor")):
            if key in baseline["comparison"]:
                ratio = baseline["comparison"][key]
                print(f"  {label}: least flattering {ratio['min']:.2f}, most flattering {ratio['max']:.2f}")
    if baseline.get("nginx_skipped"):
        print(f"nginx proxy skipped: {baseline['nginx_skipped']}")
    for sizes, pair in baseline.get("pairs", {}).items():
        split_d, split_n = pair["distributor_split_error_points"], pair["nginx_split_error_points"]
        print(f"vs nginx ({sizes}): packets/s x{pair['packets_per_s_ratio']:.2f}, p99 x{pair['p99_ratio']:.2f}, "
              f"message split error {'-' if split_d is None else f'{split_d:.2f}'} vs "
              f"{'-' if split_n is None else f'{split_n:.2f}'} points")
    if "skipped" in baseline:
        print(f"baseline skipped: {baseline['skipped']}")


def print_stress_cpu(report: dict[str, Any]) -> None:
    stress = report.get("stress_cpu") or {}
    if stress.get("skipped"):
        print(f"\nstress-cpu skipped: {stress['skipped']}")
    elif stress:
        per_s, lat, lag = stress["answers_per_s"], stress["latency_all_answers_ms"], stress["event_loop_lag_ms"]
        print(f"\nstress-cpu (run {stress['run']}): {stress['wrk_processes']} wrk x "
              f"{stress['connections'] // stress['wrk_processes']} connections, closed loop, free analyzers, "
              f"{stress['duration_s']:.1f} s, load {fmt_load(stress['loadavg'])}")
        print(f"  answers/s: 202 {per_s['202']:.0f}  503 {per_s['503']:.0f}  429 {per_s['429']:.0f}  "
              f"other {per_s['other']:.0f}  (all {per_s['all']:.0f}); socket errors {stress['errors']}")
        print(f"  latency of ALL answers: p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  p99.9 {lat['p99.9']:.2f} ms"
              f"  max {lat['max']:.2f} ms -> p99 < {stress['p99_target_ms']:.0f} ms: "
              f"{'met' if stress['p99_met'] else 'MISSED'}" + ("" if stress["latency_is_raw"] else
                                                                 " (wrk's corrected figures: raw ones unreadable)"))
        corr = stress["latency_wrk_corrected_ms"] or {}
        print(f"  mean {lat.get('mean', 0):.1f} ms vs Little's law {stress['connections']} connections / answers/s = "
              f"{stress['littles_law_mean_ms']:.1f} ms; wrk's coordinated-omission-corrected figures: "
              f"p50 {corr.get('p50', 0):.2f} ms  p99 {corr.get('p99', 0):.2f} ms  p99.9 {corr.get('p99.9', 0):.2f} ms")
        fl = stress["floor"]
        print(f"  same load on the bare floor (run {fl['run']}): {fl['answers_per_s']:.0f} answers/s, p50 "
              f"{fl['latency_ms']['p50']:.2f} ms  p99 {fl['latency_ms']['p99']:.2f} ms  max {fl['latency_ms']['max']:.2f} "
              f"ms; a mean under {stress['p99_target_ms']:.0f} ms needs >= "
              f"{stress['answers_per_s_needed_for_mean_under_target']:.0f} answers/s")
        with_ra = stress["status_503_with_retry_after"]
        print(f"  503: {stress['status_503']} answers, {with_ra} with Retry-After; distributor's own counts "
              f"{stress['distributor_outcomes']}")
        print(f"  event-loop lag (/admin/workers, 1 sample/s/worker, {lag['samples']} samples): max {lag['max']:.1f} ms"
              f"  p99 {lag['p99']:.1f} ms  p50 {lag['p50']:.1f} ms")
        print(f"  peak queued MiB {fmt_mb(stress['peak_queued_mb'])}; peak RSS MiB {fmt_mb(stress['peak_rss_mb'])} "
              f"(bound queued + 60: {'ok' if stress['rss_within_bound'] else 'EXCEEDED'})")
        per = stress["cpu_us_per_answer"]
        print(f"  CPU µs per answer: distributor {per.get('sut', 0):.1f}, sinks {per.get('sinks', 0):.1f}, "
              f"wrk {per.get('generator', 0):.1f}; machine busy {stress['machine_busy_fraction']:.0%}")
