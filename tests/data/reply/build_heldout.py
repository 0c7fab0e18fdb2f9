# ruff: noqa: RUF001  (fullwidth punctuation is the data)
"""Writes heldout.jsonl: 35 messages written after the `reply` rules were final and
never used to tune them (styles unlike labelled.jsonl's: Yahoo, Thunderbird "wrote on",
Outlook bold labels, Foxmail, forwarded blocks, top-posting with interleaved lines).
Same format as labelled.jsonl. Run to rebuild."""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

HERE = Path(__file__).parent

# (lang, style, body, expected)
CASES: list[tuple[str, str, str, str]] = [
    ("en", "yahoo", "Works now, thank you.\n\n    On Monday, January 8, 2024, 10:15:02 AM GMT+1, Anna Miller <anna@support.example> wrote:\n\n    Please restart the router.", "Works now, thank you."),
    ("en", "thunderbird_wrote_on", "Done.\n\nAnna Miller wrote on 08.01.2024 10:15:\n> Please restart the router.", "Done."),
    ("en", "outlook_bold", "See the log below.\n\n*From:* Anna Miller <anna@support.example>\n*Sent:* Monday, January 8, 2024 10:15\n*To:* Tom\n*Subject:* router\n\nPlease restart the router.", "See the log below."),
    ("en", "forwarded", "FYI, the customer reports the same.\n\n---------- Forwarded message ---------\nFrom: Customer <c@x.example>\nDate: Mon, Jan 8, 2024\nSubject: router\n\nIt is broken.", "FYI, the customer reports the same."),
    ("en", "sent_from_outlook_android", "Will check tomorrow.\n\nGet Outlook for Android\n\nFrom: Anna <anna@support.example>\nSent: Monday, January 8, 2024 10:15:02 AM\nTo: Tom\nSubject: router", "Will check tomorrow."),
    ("de", "outlook_bold", "Anbei das Protokoll.\n\n*Von:* Anna Müller <anna@support.example>\n*Gesendet:* Montag, 8. Januar 2024 10:15\n*An:* Tom\n*Betreff:* Router\n\nBitte den Router neu starten.", "Anbei das Protokoll."),
    ("de", "thunderbird", "Erledigt, danke.\n\nAm 08.01.24 um 10:15 schrieb Anna Müller:\n> Bitte den Router neu starten.", "Erledigt, danke."),
    ("de", "web_de", "Passt so.\n\nGesendet: Montag, 08. Januar 2024 um 10:15 Uhr\nVon: \"Anna Müller\" <anna@support.example>\nAn: tom@x.example\nBetreff: Router\n\nBitte neu starten.", "Passt so."),
    ("de", "signature_dashes", "Ich melde mich morgen.\n\n--\nTom Becker\nIT-Abteilung", "Ich melde mich morgen."),
    ("de", "mobile_gesendet_von", "Kurz: ja.\n\nGesendet von meinem iPhone\n\n> Am 08.01.2024 um 10:15 schrieb Anna Müller <anna@support.example>:\n> \n> Bitte neu starten.", "Kurz: ja."),
    ("fr", "apple", "C'est réglé.\n\n> Le 8 janv. 2024 à 10:15, Anne Martin <anne@support.example> a écrit :\n> \n> Merci de redémarrer.", "C'est réglé."),
    ("fr", "outlook_bold", "Voir le journal ci-dessous.\n\n*De :* Anne Martin <anne@support.example>\n*Envoyé :* lundi 8 janvier 2024 10:15\n*À :* Thomas\n*Objet :* routeur\n\nMerci de redémarrer.", "Voir le journal ci-dessous."),
    ("fr", "thunderbird", "Parfait.\n\nLe 08/01/2024 à 10:15, Anne Martin a écrit :\n> Merci de redémarrer.", "Parfait."),
    ("fr", "forwarded", "Pour info.\n\n---------- Message transféré ---------\nDe : Client <c@x.example>\nDate : lun. 8 janv. 2024\nObjet : routeur\n\nÇa ne marche pas.", "Pour info."),
    ("fr", "mobile_samsung", "Oui.\n\nEnvoyé depuis mon smartphone Samsung Galaxy.\n\n-------- Message d'origine --------\nDe : Anne <anne@support.example>", "Oui."),
    ("es", "apple", "Ya funciona.\n\n> El 8 ene 2024, a las 10:15, Ana García <ana@support.example> escribió:\n> \n> Reinicie el router.", "Ya funciona."),
    ("es", "outlook_bold", "Adjunto el registro.\n\n*De:* Ana García <ana@support.example>\n*Enviado:* lunes, 8 de enero de 2024 10:15\n*Para:* Tomás\n*Asunto:* router\n\nReinicie el router.", "Adjunto el registro."),
    ("es", "thunderbird", "Listo.\n\nEl 8/1/24 a las 10:15, Ana García escribió:\n> Reinicie el router.", "Listo."),
    ("es", "forwarded", "Para tu información.\n\n---------- Forwarded message ---------\nDe: Cliente <c@x.example>\nDate: lun, 8 ene 2024\nSubject: router\n\nNo funciona.", "Para tu información."),
    ("es", "mobile", "Sí.\n\nEnviado desde mi Samsung Galaxy\n\nEl lun, 8 ene 2024 a las 10:15, Ana <ana@support.example> escribió:\n> Reinicie.", "Sí."),
    ("pt", "apple", "Já funciona.\n\n> Em 8 de jan. de 2024, à(s) 10:15, Ana Souza <ana@support.example> escreveu:\n> \n> Reinicie o roteador.", "Já funciona."),
    ("pt", "outlook_bold", "Segue o log.\n\n*De:* Ana Souza <ana@support.example>\n*Enviado:* segunda-feira, 8 de janeiro de 2024 10:15\n*Para:* Tomás\n*Assunto:* roteador\n\nReinicie o roteador.", "Segue o log."),
    ("pt", "thunderbird", "Pronto.\n\nEm 08/01/2024 10:15, Ana Souza escreveu:\n> Reinicie o roteador.", "Pronto."),
    ("pt", "forwarded", "Para sua informação.\n\n---------- Mensagem encaminhada ---------\nDe: Cliente <c@x.example>\nData: seg., 8 de jan. de 2024\nAssunto: roteador\n\nNão funciona.", "Para sua informação."),
    ("pt", "mobile", "Sim.\n\nEnviado do meu iPhone\n\nEm seg., 8 de jan. de 2024 às 10:15, Ana <ana@support.example> escreveu:\n> Reinicie.", "Sim."),
    ("ja", "thunderbird", "解決しました。\n\n山田 花子 wrote:\n> ルーターを再起動してください。", "解決しました。"),
    ("ja", "outlook", "ログを添付します。\n\n差出人: 山田 花子 <hanako@support.example>\n送信日時: 2024年1月8日 10:15\n宛先: 田中\n件名: ルーター\n\nルーターを再起動してください。", "ログを添付します。"),
    ("ja", "san_wrote", "承知しました。\n\n山田 花子 さんは書きました:\n> ルーターを再起動してください。", "承知しました。"),
    ("ja", "docomo_mobile", "了解です。\n\ndocomoから送信\n\n-----Original Message-----\n差出人: 山田 花子", "了解です。"),
    ("ja", "gmail_ja_wrapped", "直りました。\n\n2024年1月8日(月) 10:15 山田 花子 <\nhanako@support.example>:\n\n> ルーターを再起動してください。", "直りました。"),
    ("zh", "foxmail", "已经好了。\n\n发件人：王芳 <fang@support.example>\n发送时间：2024年1月8日 10:15\n收件人：张伟\n主题：路由器\n\n请重启路由器。", "已经好了。"),
    ("zh", "qq_mobile", "好的。\n\n发自我的iPhone\n\n------------------ Original ------------------\nFrom: 王芳 <fang@support.example>", "好的。"),
    ("zh", "gmail_zh", "谢谢，问题解决了。\n\n王芳 <fang@support.example> 于2024年1月8日周一 10:15写道：\n\n> 请重启路由器。", "谢谢，问题解决了。"),
    ("zh", "traditional_outlook", "已處理。\n\n寄件者: 王芳 <fang@support.example>\n寄件日期: 2024年1月8日 10:15\n收件者: 張偉\n主旨: 路由器\n\n請重啟路由器。", "已處理。"),
    ("zh", "netease", "收到。\n\n在 2024-01-08 10:15:02，\"王芳\" <fang@support.example> 写道：\n>请重启路由器。", "收到。"),
]


def _message(i: int, body: str) -> str:
    msg = EmailMessage()
    msg["From"] = "c@customer.example"
    msg["Subject"] = "Re: router"
    msg["Message-ID"] = f"<heldout-{i}@customer.example>"
    msg.set_content(body, charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(policy=SMTP).decode("ascii")


if __name__ == "__main__":
    with (HERE / "heldout.jsonl").open("w", encoding="utf-8") as f:
        for i, (lang, style, body, expected) in enumerate(CASES):
            row = {"id": f"heldout-{lang}-{style}", "lang": lang, "style": style,
                   "raw": _message(i, body), "expected": expected}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(len(CASES), "messages")
